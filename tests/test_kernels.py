"""Triton kernels against their torch references, under TRITON_INTERPRET=1 on the CPU (and on CUDA
when present). Each case runs in a subprocess: the interpreter must be selected before Triton loads."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

CHECK = r"""
import json, sys, torch
from ditcache import kernels
from ditcache.kernels import _triton
device = sys.argv[1]
torch.manual_seed(0)
errors = {}
for heads, queries, keys, head_dim in [(2, 40, 40, 16), (3, 33, 70, 72), (1, 64, 17, 128)]:
    q = torch.randn(2, heads, queries, head_dim, device=device)
    k = torch.randn(2, heads, keys, head_dim, device=device)
    scale = head_dim ** -0.5
    ref = kernels.received_attention_reference(q, k, scale)
    errors[f"received {heads}x{queries}x{keys}x{head_dim}"] = (_triton.received_attention_triton(q, k, scale) - ref).abs().max().item() / ref.abs().max().item()
for dim, affine in [(32, False), (72, True), (1152, False)]:
    batch, tokens, count = 4, 20, 7
    x = torch.randn(batch, tokens, dim, device=device).transpose(0, 0)
    index = torch.stack([torch.randperm(tokens, device=device)[:count] for _ in range(batch)])
    flat = (index + torch.arange(batch, device=device)[:, None] * tokens).reshape(-1)
    scale, shift = torch.randn(batch, 1, dim, device=device), torch.randn(batch, 1, dim, device=device)
    weight, bias = (torch.randn(dim, device=device), torch.randn(dim, device=device)) if affine else (None, None)
    ref = kernels.gather_modulate_reference(x, flat, count, scale, shift, 1e-6, weight, bias)
    got = _triton.gather_modulate_triton(x, flat, count, scale, shift, 1e-6, weight, bias)
    errors[f"gather {dim} {affine}"] = (got - ref).abs().max().item()
    gate, rows = torch.randn(batch, 1, dim, device=device), torch.randn(batch, count, dim, device=device)
    cache_ref, cache_got = torch.randn(batch, tokens, dim, device=device), None
    cache_got = cache_ref.clone()
    out_ref = kernels.scatter_gate_residual_reference(x, gate, cache_ref, rows, flat)
    out_got = _triton.scatter_gate_residual_triton(x, gate, cache_got, rows, flat)
    errors[f"scatter {dim}"] = max((out_got - out_ref).abs().max().item(), (cache_got - cache_ref).abs().max().item())
print(json.dumps(errors))
"""


def run_check(device, extra_env):
    env = dict(os.environ, DITCACHE_TRITON="1", **extra_env)
    result = subprocess.run([sys.executable, "-c", CHECK, device], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# the CUDA case runs where a GPU is (eval/gpu_bench.sh runs this file there); the CPU case runs everywhere
@pytest.mark.parametrize("device", ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
def test_kernels_match_the_torch_references(device):
    errors = run_check(device, {"TRITON_INTERPRET": "1"} if device == "cpu" else {})
    assert len(errors) == 9
    for case, error in errors.items():
        assert error <= 1e-4, (case, error)


def test_the_switch_defaults_to_torch(monkeypatch):
    from ditcache import kernels

    monkeypatch.delenv("DITCACHE_TRITON", raising=False)
    assert not kernels.triton_enabled(torch.zeros(1))
    monkeypatch.setenv("DITCACHE_TRITON", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.triton_enabled(torch.zeros(1))


END_TO_END = r"""
import os, json, torch
import ditcache
from ditcache.eval.builders import dit_transformer, flux_transformer
torch.manual_seed(0)
results = {}
dit = dit_transformer()
latents, labels = torch.randn(2, 4, 8, 8), torch.tensor([1, 1000])
ditcache.apply_cache(dit, ditcache.ToCaConfig(cache_interval=3, cache_ratio=0.5, schedule="constant", score="attention"))
outputs = {}
for switch in ("0", "1"):
    os.environ["DITCACHE_TRITON"] = switch
    with torch.no_grad():
        outputs[switch] = [dit(latents, timestep=torch.tensor([t, t]), class_labels=labels).sample for t in (900, 800, 700)]
results["dit"] = max((a - b).abs().max().item() for a, b in zip(outputs["0"], outputs["1"]))
print(json.dumps(results))
"""


@pytest.mark.slow
def test_cached_model_with_kernels_matches_the_torch_path():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", END_TO_END], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    assert 0 < errors["dit"] <= 1e-4  # nonzero: the Triton path really ran
