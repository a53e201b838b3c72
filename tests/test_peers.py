"""The peers side by side: MagCache calibrated on the model it runs on, cache-dit's DBCache, skipped by name
where its package is missing."""

import importlib.util

import pytest
import torch
from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

from ditcache.eval import peers
from ditcache.eval.builders import flux_pipeline
from ditcache.eval.speed import parse_method
from ditcache.eval.sweep_config import SweepConfig

STEPS = 12
CALL = {"prompt": "a red fox", "negative_prompt": "", "true_cfg_scale": 3.0, "height": 32, "width": 32,
        "num_inference_steps": STEPS, "output_type": "pt"}


@pytest.fixture(scope="module")
def pipe():
    pipe = flux_pipeline(num_layers=2, num_single_layers=2)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(pipe):
    return pipe(**CALL, generator=torch.Generator().manual_seed(0)).images


def test_magcache_is_calibrated_on_the_model_it_runs_on(pipe, monkeypatch):
    uncached = images(pipe)
    configs, apply = [], peers.apply_mag_cache
    monkeypatch.setattr(peers, "apply_mag_cache", lambda module, config: configs.append(config) or apply(module, config))
    peer = peers.DiffusersCache("magcache:0.5")
    peer.apply(pipe, STEPS, dict(CALL, generator=torch.Generator().manual_seed(0)))
    calibration, used = configs
    assert calibration.calibrate and not used.calibrate
    assert used.mag_ratios.shape == (STEPS,) and not torch.allclose(used.mag_ratios, FLUX_MAG_RATIOS[:STEPS])
    cached = images(pipe)
    peer.remove(pipe)
    assert not torch.equal(cached, uncached)  # a threshold of 0.5 skips steps
    assert torch.equal(images(pipe), uncached)


@pytest.mark.parametrize("spec", ["dbcache:0.5", "dbcache:0.5:1"])
def test_cache_dit_dbcache_runs_and_leaves_nothing_behind(pipe, spec):
    method = parse_method(spec)
    assert method.unavailable() is None  # installed with the test extras
    uncached = images(pipe)
    method.apply(pipe, STEPS, CALL)
    cached = images(pipe)
    method.remove(pipe)
    assert not torch.equal(cached, uncached) and torch.isfinite(cached).all()
    assert torch.equal(images(pipe), uncached)
    assert not [name for name, module in pipe.transformer.named_modules() if "forward" in module.__dict__]
    fbc = parse_method("fbc:0.2")  # another cache hooked on after it sees diffusers' own calls
    fbc.apply(pipe, STEPS, CALL)
    assert torch.isfinite(images(pipe)).all()
    fbc.remove(pipe)


def test_a_peer_without_its_package_is_skipped_by_name(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cache_dit" else real(name, *a))
    config = SweepConfig(pipeline="tiny-flux", methods=["fora:2", "dbcache:0.1", "dbcache:0.1:1"], prompts=["a"])
    assert config.methods == ["uncached", "fora:2"]
    assert set(config.skipped) == {"dbcache:0.1", "dbcache:0.1:1"} and "cache-dit" in config.skipped["dbcache:0.1"]
