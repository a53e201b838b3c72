"""Context parallelism (diffusers' ``enable_parallelism`` with Ulysses) on two gloo processes: every decision
that changes which modules run is made from measurements all-reduced over the ranks, so the ranks run the
same collectives and decide as one process would."""

import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ditcache import ToCaConfig, apply_cache, cache_stats, preset
from ditcache.eval.builders import flux_transformer

STEPS = 28
TIMEOUT = datetime.timedelta(seconds=60)  # a rank left waiting in a collective fails the test instead of hanging it


def flux_inputs() -> dict:
    generator = torch.Generator().manual_seed(0)
    ids = torch.zeros(20, 3)
    ids[4:, 1], ids[4:, 2] = torch.arange(4).repeat_interleave(4).float(), torch.arange(4).repeat(4).float()
    return {"hidden_states": torch.randn(1, 16, 16, generator=generator), "encoder_hidden_states": torch.randn(1, 4, 32, generator=generator),
            "pooled_projections": torch.randn(1, 32, generator=generator), "guidance": torch.tensor([3.5]),
            "img_ids": ids[4:], "txt_ids": ids[:4]}


def run_flux(model) -> list[torch.Tensor]:
    inputs = flux_inputs()
    with torch.no_grad():
        return [model(timestep=torch.tensor([t / STEPS]), return_dict=False, **inputs)[0] for t in range(STEPS, 0, -1)]


def flux(config, parallel: bool):
    torch.manual_seed(0)
    model = flux_transformer()
    if parallel:
        from diffusers import ContextParallelConfig

        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
    apply_cache(model, config)
    outputs = run_flux(model)
    return [torch.as_tensor(output.wait() if hasattr(output, "wait") else output).clone() for output in outputs], cache_stats(model)


def configs() -> dict:
    return {"toca": ToCaConfig(cache_interval=3, cache_ratio=0.7, tolerance=0.05), "ditcache": preset("ditcache"),
            "budget": preset("ditcache", cache_memory="8H")}


def worker(rank: int, port: int, folder: str) -> None:
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "HF_HUB_OFFLINE": "1"}
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=TIMEOUT)
    # Stand-in, for this test only: diffusers places rank r on device r % torch.accelerator.device_count(), which is
    # 0 on a machine without an accelerator (a division by zero); one device makes every rank's device cpu:0.
    torch.accelerator.device_count = lambda: 1
    torch.set_num_threads(1)
    results = {}
    for name, config in configs().items():
        outputs, stats = flux(config, parallel=True)
        results[name] = {"full": torch.tensor(stats.full_step_indices), "last": outputs[-1], "layout": stats.cache_layout,
                         "bytes": stats.cache_bytes, "budget": stats.cache_budget}
    from test_generic import build

    wan = build("wan")
    from diffusers import ContextParallelConfig

    wan.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
    try:
        apply_cache(wan, ToCaConfig(cache_interval=2, cache_ratio=0.5, score="attention"))
        results["wan_refusal"] = "none"
    except ValueError as error:
        results["wan_refusal"] = str(error)
    torch.save(results, os.path.join(folder, f"rank{rank}.pt"))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_ulysses_ranks_decide_together_and_as_one_process_would(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    # ToCa with error control: each rank recomputes tokens of its own shard, and both follow one schedule
    assert torch.equal(ranks[0]["toca"]["full"], ranks[1]["toca"]["full"])
    assert 3 < len(ranks[0]["toca"]["full"]) < STEPS
    # The preset recomputes no token: its measurements summed over the shards are the single process's. With a budget
    # that binds, each rank plans on the whole call's shapes (an upper bound of its shard's cache): every rank keeps
    # the single process's layout, within the budget
    for name in ("ditcache", "budget"):
        outputs, stats = flux(configs()[name], parallel=False)
        for results in ranks:
            assert tuple(results[name]["full"].tolist()) == stats.full_step_indices
            torch.testing.assert_close(results[name]["last"], outputs[-1], rtol=1e-5, atol=1e-5)
            assert results[name]["layout"] == stats.cache_layout and results[name]["budget"] == stats.cache_budget
            assert 0 < results[name]["bytes"] <= stats.cache_bytes <= stats.cache_budget
    assert stats.cache_layout != "branch, model, order 2"  # the budget chose
    for results in ranks:
        assert "under context parallelism choose score='k_norm' or 'random'" in results["wan_refusal"]
