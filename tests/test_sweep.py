"""Sweeps: grid expansion, prompts, outputs, resume after kill -9, a changed config, two processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ditcache.cli import CommandError
from ditcache.eval import sweep

CONFIG = {
    "pipeline": "tiny-dit",
    "steps": 4,
    "seeds": [0, 1],
    "prompts": ["zero", "1", "one"],
    "methods": ["fora:2", {"grid": "toca:{n}:0.7:{score}", "n": [2], "score": ["random", "attention"]}],
    "metrics": ["psnr", "ssim", "fid", "kid"],
    "metric_options": {"fid": {"feature": "ditcache.eval.builders:random_features"}},
    "grid_prompts": 2,
    "ours": ["toca:N:0.7:attention"],
    "gap_speedups": [1.2, 1.5, 100],
}


def write_config(folder: Path, **changes) -> Path:
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(CONFIG | changes))
    return path


def command(config: Path, output: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ditcache.eval.sweep", str(config), "--output", str(output), "--quiet", *extra]


def environment() -> dict:
    return os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def comparable(output: Path) -> list[dict]:
    """The results without the wall-clock columns, which differ between any two runs."""
    rows = json.loads((output / "results.json").read_text())
    return [{k: v for k, v in row.items() if k not in sweep.TIMING_COLUMNS} for row in rows]


def test_grid_entries_expand_and_uncached_is_added():
    specs = sweep.expand_methods(["fora:3", {"grid": "toca:{n}:{r}", "n": [3, 4], "r": [0.8, 0.9]}, "fora:3"])
    assert specs == ["fora:3", "toca:3:0.8", "toca:3:0.9", "toca:4:0.8", "toca:4:0.9"]
    config = sweep.SweepConfig(pipeline="tiny-dit", methods=specs, prompts=["zero"])
    assert config.methods[0] == "uncached"


def test_bad_sweep_configs_fail_before_any_work():
    with pytest.raises(ValueError, match="metrics: unknown.*'fidd'"):
        sweep.SweepConfig(pipeline="tiny-dit", methods=[], prompts=["zero"], metrics=["fidd"])
    with pytest.raises(ValueError, match="cache_ratio"):
        sweep.SweepConfig(pipeline="tiny-dit", methods=["toca:3:1.5"], prompts=["zero"])
    with pytest.raises(ValueError, match=r"ours: \['ditcache:N'\] name no method of this sweep; its families: fora:N"):
        sweep.SweepConfig(pipeline="tiny-dit", methods=["fora:2", "fora:3"], prompts=["zero"], ours=["ditcache:N"])
    with pytest.raises(ValueError, match="add psnr to metrics"):
        sweep.SweepConfig(pipeline="tiny-dit", methods=["fora:2"], prompts=["zero"], ours=["fora:N"], metrics=["ssim"])
    with pytest.raises(ValueError, match="gap_speedups must be a non-empty list of numbers >= 1"):
        sweep.SweepConfig(pipeline="tiny-dit", methods=["fora:2"], prompts=["zero"], ours=["fora:N"], gap_speedups=[0.5])


@pytest.mark.parametrize(
    "spec, problem",
    [
        ("fbc:abc", "`threshold` must be a number >= 0.0, got 'abc'"),
        ("fbc:nan", "`threshold` must be a number >= 0.0"),
        ("magcache:-1", "`threshold` must be a number >= 0.0"),
        ("taylorseer:3:x", "`max_order` must be an integer >= 0, got 'x'"),
        ("taylorseer:0", "`interval` must be an integer >= 1"),
        ("taylorseer:3:1:2", "expected at most taylorseer:interval:max_order"),
        ("pab:1.5", "`block_skip_range` must be an integer >= 1"),
        ("fora:x", "invalid literal for int()"),
        ("toca:3:high", "could not convert string to float"),
        ("fora:3:order=9", "`forecast_order` must be an integer in [0, 4]"),
        ("fora:3:tol=-1", "`tolerance` must be a number >= 0.0"),
        ("toca:3:0.9:probe=0.1", "unknown option 'probe' for toca"),
        ("fora:3:probe=0.1", "`probe_ratio` measures the error for error control"),
        ("fora:3:speed=2", "unknown option 'speed'"),
        ("toca:4:0.9+tome:x", "could not convert string to float"),
    ],
)
def test_bad_method_specs_fail_when_the_config_is_read(spec, problem, tmp_path, monkeypatch):
    with pytest.raises(ValueError) as error:
        sweep.SweepConfig(pipeline="tiny-dit", methods=[spec], prompts=["zero"])
    assert f"method {spec!r}" in str(error.value) and problem in str(error.value)
    monkeypatch.setattr(sweep, "load_pipeline", lambda *args: pytest.fail("a model was loaded"))
    with pytest.raises(CommandError, match="method"):  # `ditcache sweep` prints it as one line
        sweep.main([str(write_config(tmp_path, methods=["fora:2", spec])), "--output", str(tmp_path / "out"), "--quiet"])
    assert not (tmp_path / "out").exists()


def test_error_control_specs_set_their_fields():
    from ditcache import FORAConfig, ToCaConfig
    from ditcache.eval.speed import parse_method

    assert parse_method("toca:4:0.9:v_norm:order=1:tol=0.1:max=8:share=0.5").config == ToCaConfig(
        cache_interval=4, cache_ratio=0.9, score="v_norm", schedule="constant", forecast_order=1, tolerance=0.1,
        max_interval=8, random_share=0.5)
    assert parse_method("fora:3:tol=0.2:probe=0.05").config == FORAConfig(cache_interval=3, tolerance=0.2, probe_ratio=0.05)
    assert parse_method("fora:4:order=2:fc=bdf2_heun").config == FORAConfig(cache_interval=4, forecast_order=2, forecaster="bdf2_heun")
    assert parse_method("fora:4:order=1:fc=hermite:sigma=0.7").config == FORAConfig(
        cache_interval=4, forecast_order=1, forecaster="hermite", hermite_scale=0.7)
    with pytest.raises(ValueError, match="`forecast_order` must be 2"):
        parse_method("fora:4:order=1:fc=bdf2_heun")
    from ditcache import preset

    assert parse_method("ditcache").config == preset("ditcache")
    assert parse_method("ditcache:0.4:max=16").config == preset("ditcache", tolerance=0.4, max_interval=16)
    with pytest.raises(ValueError, match="unknown option 'share'"):
        parse_method("ditcache:0.4:share=0.5")
    # the preset's first interval by hand: its first full steps and longest interval follow it, as the rule's would
    assert parse_method("ditcache:0.8:first=2").config == preset("ditcache", tolerance=0.8, cache_interval=2)
    short, long = parse_method("ditcache:0.8:first=2").config, parse_method("ditcache:0.1:first=5").config
    assert (short.cache_interval, short.full_steps_at_start, short.max_interval) == (2, None, 12)
    assert (long.cache_interval, long.full_steps_at_start, long.max_interval) == (5, 1, 15)
    with pytest.raises(ValueError, match="unknown option 'first' for fora"):
        parse_method("fora:3:first=2")


def test_peer_specs_keep_their_values():
    from ditcache.eval.peers import DiffusersCache

    assert DiffusersCache("taylorseer:3:2").options == {"interval": 3, "max_order": 2}
    assert DiffusersCache("fbc").options == {"threshold": 0.05}
    assert DiffusersCache("pab:").options == {"block_skip_range": 2}


@pytest.mark.parametrize("seeds", ["0", [0.5], [True], [-1], [2**63], [0, 1, 0], 0, 10**7, True, 2.0, None, [[0]]])
def test_bad_seeds_are_refused(seeds, tmp_path):
    with pytest.raises(ValueError, match="`seeds` must be"):
        sweep.SweepConfig(pipeline="tiny-dit", methods=[], prompts=["zero"], seeds=seeds)
    with pytest.raises(ValueError, match="`seeds` must be"):
        sweep.load_config(write_config(tmp_path, seeds=seeds))


def test_seeds_are_a_list_or_a_count(tmp_path):
    assert sweep.SweepConfig(pipeline="tiny-dit", methods=[], prompts=["zero"], seeds=3).seeds == [0, 1, 2]
    assert sweep.load_config(write_config(tmp_path, seeds=2)).seeds == [0, 1]
    assert sweep.SweepConfig(pipeline="tiny-dit", methods=[], prompts=["zero"], seeds=[2**63 - 1, 5]).seeds[0] == 2**63 - 1


def test_prompt_sources(tmp_path):
    (tmp_path / "p.txt").write_text("a fox\n\na cat\n")
    (tmp_path / "p.tsv").write_text("Prompts\tCategory\na fox\tanimals\na cat\tanimals\n")
    (tmp_path / "p.json").write_text(json.dumps([{"caption": "a fox"}, {"caption": "a cat"}]))
    assert sweep.load_prompts("p.txt", tmp_path) == ["a fox", "a cat"]
    assert sweep.load_prompts({"file": "p.tsv", "limit": 1}, tmp_path) == ["a fox"]
    assert sweep.load_prompts({"file": "p.json", "column": "caption"}, tmp_path) == ["a fox", "a cat"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One uninterrupted run of the test sweep."""
    folder = tmp_path_factory.mktemp("sweep")
    config = write_config(folder)
    subprocess.run(command(config, folder / "out"), check=True, env=environment(), timeout=600)
    return config, folder / "out"


def test_sweep_writes_images_results_plots(finished):
    _, output = finished
    rows = json.loads((output / "results.json").read_text())
    assert [row["method"] for row in rows] == ["uncached", "fora:2", "toca:2:0.7:random", "toca:2:0.7:attention"]
    assert all(row["images"] == 6 for row in rows)
    assert rows[0]["flops_speedup"] == 1.0 and all(row["flops_speedup"] > 1.2 for row in rows[1:])
    assert "psnr" not in rows[0] and all(10 < row["psnr"] and 0 < row["ssim"] <= 1 for row in rows[1:])
    assert all(row["fid"] >= 0 and "kid_mean" in row for row in rows[1:])
    assert (output / "results.csv").read_text().splitlines()[0].startswith("method,folder,images,latency_s,flops")
    assert len(list((output / "images").rglob("*.png"))) == 24
    assert (output / "speed_quality.png").stat().st_size > 10_000
    assert sorted(p.name for p in (output / "grids").iterdir()) == ["prompt-00000.png", "prompt-00001.png"]
    assert not list(output.rglob("*.tmp"))
    # ours against the envelope of the other two families, as eval/gaps.py computes it from the results
    from ditcache.eval.gaps import at

    points = {row["method"]: (row["flops_speedup"], row["psnr"]) for row in rows[1:]}
    mine, theirs = at([points["toca:2:0.7:attention"]], 1.2), max(at([points[m]], 1.2) for m in ("fora:2", "toca:2:0.7:random"))
    table = (output / "gaps.md").read_text().splitlines()
    assert table[2].startswith("| FLOPs speedup | others' envelope, PSNR (dB) | toca:N:0.7:attention: value (gap) |")
    assert table[4] == f"| 1.2 | {theirs:.2f} | {mine:.2f} ({mine - theirs:+.2f}) |"
    assert table[6] == "| 100 | - | - |"  # no method is that fast: no value, no extrapolation


def test_gaps_join_each_family_along_its_own_front():
    from ditcache.eval.gaps import at, gap_rows

    fast = [(2.0, 30.0), (4.0, 20.0), (3.0, 10.0)]  # (3, 10) is beaten by a faster point: off the front
    assert at(fast, 3.0) == 25.0 and at(fast, 1.0) == 30.0 and at(fast, 5.0) is None
    points = {"ours": [(2.0, 32.0), (3.0, 30.0)], "a": fast, "b": [(1.0, 50.0), (2.5, 28.0)]}
    rows = gap_rows(points, ["ours"], (1.5, 2.5, 3.0, 3.5))
    # at 1.5 "b" joins (1, 50) and (2.5, 28); "a" serves it from (2, 30); the envelope never joins "a" to "b"
    assert rows[0]["envelope"] == pytest.approx(50 - 22 / 3) and rows[0]["ours gap"] == pytest.approx(32 - (50 - 22 / 3))
    assert rows[1]["envelope"] == 28.0 and rows[1]["ours"] == 31.0 and rows[1]["ours gap"] == 3.0
    assert rows[2]["envelope"] == 25.0 and rows[2]["ours gap"] == 5.0
    assert rows[3]["ours"] is None and rows[3]["ours gap"] is None and rows[3]["envelope"] == 22.5


@pytest.mark.slow
def test_killed_sweep_resumes_to_the_same_results(finished, tmp_path):
    config, reference = finished
    output = tmp_path / "out"
    process = subprocess.Popen(command(config, output), env=environment(), start_new_session=True)
    deadline = time.time() + 300
    while len(list(output.glob("images/*/*.json"))) < 8 and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done = len(list(output.glob("images/*/*.json")))
    assert 8 <= done < 24, "the kill must land mid-generation"
    assert not (output / "results.json").exists()

    subprocess.run(command(config, output), check=True, env=environment(), timeout=600)
    assert comparable(output) == comparable(reference)
    assert len(list(output.glob("images/*/*.png"))) == 24
    mtimes = {p: p.stat().st_mtime_ns for p in output.rglob("*.json")}
    subprocess.run(command(config, output), check=True, env=environment(), timeout=600)  # all done: nothing redone
    assert {p: p.stat().st_mtime_ns for p in output.glob("images/*/*.json")} == {p: t for p, t in mtimes.items() if "images" in p.parts}
    assert {p.stat().st_mtime_ns for p in output.glob("metrics/*.json")} == {t for p, t in mtimes.items() if "metrics" in p.parts}


def test_changed_config_is_refused_unless_allowed(finished, tmp_path):
    config, reference = finished
    changed = write_config(tmp_path, steps=5)
    result = subprocess.run(command(changed, reference), env=environment(), capture_output=True, text=True)
    assert result.returncode != 0 and "different configuration (changed: steps)" in result.stderr
    # what only the report reads is no different configuration: another `ours` goes on in the same folder
    import shutil

    from ditcache.eval.sweep_generation import check_manifest

    shutil.copytree(reference, tmp_path / "copy", ignore=shutil.ignore_patterns("*.png"))
    check_manifest(tmp_path / "copy", sweep.load_config(write_config(tmp_path, ours=["fora:N"], gap_speedups=[2])), False)


@pytest.mark.slow
def test_two_processes_give_the_same_results(finished, tmp_path):
    """The README's command for several processes on the CPU; each image's sidecar names the process that wrote it."""
    config, reference = finished
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "ditcache.eval.sweep",
              str(config), "--output", str(tmp_path / "out"), "--device", "cpu", "--quiet"]
    subprocess.run(launch, check=True, env=environment(), timeout=600)
    assert comparable(tmp_path / "out") == comparable(reference)
    writers = {json.loads(path.read_text())["process"] for path in (tmp_path / "out" / "images").glob("*/*.json")}
    assert writers == {0, 1}


@pytest.mark.parametrize("path", sorted(Path(sweep.__file__).parent.glob("configs/*.yaml")), ids=lambda p: p.stem)
def test_example_configs_are_valid(path):
    raw = yaml.safe_load(path.read_text())
    prompts = raw["prompts"]
    if isinstance(prompts, dict) and not (path.parent / prompts.get("file", "")).is_file():
        raw["prompts"] = ["a red fox in snow"]  # the paper setups read prompt files users provide
    else:
        raw["prompts"] = sweep.load_prompts(prompts, path.parent)
    raw["methods"] = sweep.expand_methods(raw["methods"])
    raw["seeds"] = list(range(raw["seeds"])) if isinstance(raw.get("seeds"), int) else raw.get("seeds", [0])
    config = sweep.SweepConfig(**raw)
    assert config.methods[0] == "uncached" and len(config.methods) >= 3


def test_prompt_metrics_of_a_finished_sweep(finished, tmp_path):
    from ditcache.eval import builders, metrics

    config_path, output = finished
    clip = builders.clip_model(tmp_path / "clip")
    config = sweep.load_config(config_path)
    config.metrics, config.metric_options = ["clip_score"], {"clip_score": {"model": str(clip)}}
    evaluator = sweep.Evaluator(config, output, "cpu")
    value = evaluator.compute("clip_score", "fora:2")["clip_score"]

    images = sweep.ImageFiles(evaluator.paths("fora:2"))[:]
    expected = metrics.CLIPScorer.from_pretrained(clip).cosines(images.float() / 255, evaluator.prompts())
    assert value == pytest.approx(metrics.CLIPScorer.aggregate(expected))
    assert evaluator.prompts()[:3] == ["zero", "zero", "1"]  # prompt-major, one per seed, as the images


@pytest.mark.parametrize("pipeline, prompts", [("tiny-dit", ["zero", "1", "one"]), ("tiny-flux", ["a fox", "a red cat", "snow"])])
def test_batched_generation_gives_the_images_of_one_by_one(pipeline, prompts, tmp_path):
    """``batch_size`` puts a method's images through the pipeline together, each with its own seed; they match
    the one-by-one images to the last bits (FLUX with true guidance: a negative prompt per image)."""
    from ditcache.eval.sweep_metrics import ImageFiles

    call = {"negative_prompt": "", "true_cfg_scale": 2.0} if pipeline == "tiny-flux" else {}
    images = {}
    for batch_size in (1, 4):
        config = sweep.SweepConfig(pipeline=pipeline, methods=["fora:2"], prompts=prompts, seeds=[0, 1], steps=3, call=call,
                                   metrics=["psnr"], grid_prompts=1, batch_size=batch_size, height=32 if call else None,
                                   width=32 if call else None)
        rows = sweep.run(config, tmp_path / str(batch_size), "cpu", quiet=True)
        assert [row["images"] for row in rows] == [6, 6]
        files = sorted((tmp_path / str(batch_size) / "images").glob("*/*.png"), key=lambda p: (p.parent.name.split("-")[0], p.name))
        sidecars = [json.loads(p.with_suffix(".json").read_text()) for p in files]
        assert all(s.get("batch", 1) == (1 if batch_size == 1 else (4 if i % 6 < 4 else 2)) for i, s in enumerate(sidecars))
        images[batch_size] = ImageFiles(files)[:].int()
    assert (images[1] - images[4]).abs().max() <= 2


def test_one_config_runs_at_several_step_counts(tmp_path):
    from ditcache import cli

    args = cli.build_parser().parse_args(["sweep", str(write_config(tmp_path)), "--output", str(tmp_path / "o"), "--steps", "20"])
    config = sweep.load_config(args.config, steps=args.steps)
    assert config.steps == 20 and sweep.load_config(args.config).steps == CONFIG["steps"]
    assert config.folder("fora:2") != sweep.load_config(args.config).folder("fora:2")


def test_a_changed_preset_gets_a_new_image_folder(tmp_path, monkeypatch):
    from ditcache import config as ditcache_config

    config = sweep.load_config(write_config(tmp_path))
    before = config.folder("ditcache:0.4"), config.folder("fora:2")
    monkeypatch.setitem(ditcache_config.NAMED_PRESETS, "ditcache", lambda **changes: ditcache_config.ditcache_config(**changes, max_interval=7))
    assert config.folder("ditcache:0.4") != before[0] and config.folder("fora:2") == before[1]


def test_a_changed_family_preset_gets_a_new_image_folder(tmp_path, monkeypatch):
    """``fora:N`` takes its first full steps from the family's preset: a library update that changes it must not
    reuse the old images."""
    from dataclasses import replace

    from ditcache import config as ditcache_config

    config = sweep.load_config(write_config(tmp_path))
    before = {spec: config.folder(spec) for spec in ("fora:2", "toca:2:0.7:random", "fbc")}
    dit = ditcache_config.PRESETS["dit"]  # the test sweep's pipeline is tiny-dit
    fora_start = dit.fora_full_steps_at_start or dit.full_steps_at_start
    changed = replace(dit, full_steps_at_start=dit.full_steps_at_start + 1, fora_full_steps_at_start=fora_start + 1)
    monkeypatch.setattr(ditcache_config, "PRESETS", {**ditcache_config.PRESETS, "dit": changed})
    after = {spec: config.folder(spec) for spec in before}
    assert after["fora:2"] != before["fora:2"] and after["toca:2:0.7:random"] != before["toca:2:0.7:random"]
    assert after["fbc"] == before["fbc"]


def test_a_sweep_that_failed_before_any_image_takes_the_corrected_config(tmp_path):
    from ditcache.eval.sweep_generation import check_manifest

    failed, corrected = (sweep.load_config(write_config(tmp_path, steps=steps)) for steps in (3, 4))
    check_manifest(tmp_path / "out", failed, allow_changed=False)  # written before the pipeline failed to load
    check_manifest(tmp_path / "out", corrected, allow_changed=False)
    (tmp_path / "out" / "images" / "fora_2-x").mkdir(parents=True)
    (tmp_path / "out" / "images" / "fora_2-x" / "p00000-s0.json").write_text("{}")
    with pytest.raises(SystemExit, match="changed: steps"):
        check_manifest(tmp_path / "out", failed, allow_changed=False)


def test_a_batched_sweep_resumed_after_losing_half_a_batch_gives_the_uninterrupted_results(tmp_path):
    """The kill between the two image writes of a batch: on resume the image is generated in the same batch."""
    import shutil

    config = sweep.SweepConfig(pipeline="tiny-dit", methods=["fora:2"], prompts=["zero", "1", "one"], seeds=[0, 1], steps=3,
                               metrics=["psnr"], grid_prompts=1, batch_size=4)
    sweep.run(config, tmp_path / "whole", "cpu", quiet=True)
    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    second = sorted((tmp_path / "resumed" / "images").glob("fora_2-*/p00000-s1.*"))  # the second image of a batch
    assert len(second) == 2
    for path in (*second, tmp_path / "resumed" / "results.json"):
        path.unlink()
    for metrics in (tmp_path / "resumed" / "metrics").glob("*.json"):
        metrics.unlink()
    sweep.run(config, tmp_path / "resumed", "cpu", quiet=True)
    assert comparable(tmp_path / "resumed") == comparable(tmp_path / "whole")
    sidecar = json.loads(second[0].with_suffix(".json").read_text())
    assert sidecar["batch"] == 4  # generated again beside the same three images, not alone
    for path in sorted((tmp_path / "whole" / "images").glob("*/*.png")):
        assert path.read_bytes() == (tmp_path / "resumed" / path.relative_to(tmp_path / "whole")).read_bytes(), path.name


def test_the_pareto_front_keeps_the_points_nothing_beats():
    from ditcache.eval.gaps import pareto_front

    points = [(1.0, 40.0), (2.0, 35.0), (2.0, 30.0), (3.0, 36.0), (4.0, 20.0), (1.5, 38.0)]
    assert pareto_front(points) == [(1.0, 40.0), (1.5, 38.0), (3.0, 36.0), (4.0, 20.0)]
    assert pareto_front([(1.0, 5.0), (2.0, 3.0), (3.0, 4.0)], lower_is_better=True) == [(2.0, 3.0), (3.0, 4.0)]
