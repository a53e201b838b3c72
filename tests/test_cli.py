"""What a new user meets first: the wheel, the ``ditcache`` command and its mistakes, the checks at apply time."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

import ditcache
from ditcache import cli
from ditcache import generate as generate_module
from ditcache.eval import digits

REPO = Path(__file__).resolve().parents[1]
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1"}


def tracked_files(under: str = ".") -> list[str]:
    result = subprocess.run(["git", "ls-files", "-z", under], cwd=REPO, capture_output=True, text=True, check=True)
    return [name for name in result.stdout.split("\0") if name]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from the committed files (a clean copy, so the checkout gains no build folder)."""
    source, dist = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("dist")
    for name in tracked_files():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    command = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(dist), "-q"]
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    return next(dist.glob("ditcache-*.whl"))


@pytest.mark.slow
def test_the_wheel_holds_every_committed_reference_file_and_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    committed = tracked_files("eval/reference_models") + tracked_files("eval/configs")
    assert len(committed) > 20
    missing = [name for name in committed if "ditcache/" + name not in names]
    assert not missing, missing
    assert any(name.endswith("digits-flux/transformer/diffusion_pytorch_model.safetensors") for name in names)


@pytest.mark.slow
def test_the_wheel_installs_only_ditcache_with_its_mapped_subpackages(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")} == {"ditcache"}
    for package in ("kernels", "pipelines", "eval"):
        assert f"ditcache/{package}/__init__.py" in names, package
    assert "ditcache/kernels/rows.py" in names and "ditcache/pipelines/toca_pipeline.py" in names


@pytest.mark.slow
def test_generate_runs_from_the_unpacked_wheel(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {**OFFLINE, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import ditcache.eval.digits as d; print(d.REFERENCE_DIR)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert Path(where.stdout.strip()).is_relative_to(site)  # the wheel's copy, not the checkout's
    command = [sys.executable, "-m", "ditcache", "generate", "--prompt", "a handwritten digit one", "--steps", "3",
               "--out", "one.png", "--quiet"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "one.png").is_file()


def run_command(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        status = cli.main(argv)
    except SystemExit as exit:  # argparse's own errors
        status = exit.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


MISTAKES = {
    "missing model folder": (["generate", "--model", "{tmp}/no/such/model", "--prompt", "x"], "no such folder"),
    "hub id offline": (["generate", "--model", "ditcache-tests/no-such-model", "--prompt", "x"], "ditcache-tests/no-such-model"),
    "folder without a pipeline": (["generate", "--model", "{tmp}", "--prompt", "x"], "model_index.json"),
    "cache ratio out of range": (["generate", "--cache-ratio", "1.5"], "cache_ratio"),
    "cache interval zero": (["generate", "--cache-interval", "0"], "cache_interval"),
    "zero steps": (["generate", "--steps", "0"], "--steps"),
    "negative seed": (["generate", "--seed", "-1"], "--seed"),
    "unknown method": (["generate", "--method", "fastest"], "fastest"),
    "ratio with FORA": (["generate", "--method", "fora", "--cache-ratio", "0.5"], "cache_ratio"),
    "unknown output format": (["generate", "--out", "digits.bmp"], "--out"),
    "output folder missing": (["generate", "--out", "{tmp}/no/such/folder/digits.png"], "does not exist"),
    "bad bench method": (["bench", "--methods", "toca:0:0.9"], "toca:0:0.9"),
    "unknown bench method": (["bench", "--methods", "fastest"], "fastest"),
    "bad bench size": (["bench", "--size", "big"], "--size"),
    "bad bench width": (["bench", "--width", "huge"], "--width"),
    "missing sweep config": (["sweep", "{tmp}/missing.yaml", "--output", "{tmp}/out"], "missing.yaml"),
    "malformed sweep config": (["sweep", "{tmp}/bad.yaml", "--output", "{tmp}/out"], "bad.yaml"),
    "fetch offline": (["eval", "fetch", "inception"], "HF_HUB_OFFLINE"),
    "fetch unknown weights": (["eval", "fetch", "nope"], "nope"),
    "unknown device": (["generate", "--device", "nope"], "--device"),
    "cuda without a GPU": (["generate", "--device", "cuda"], "--device"),
    "seed past 64 bits": (["generate", "--seed", str(2**70)], "--seed"),
    "DiT class index out of range": (["generate", "--model", "{dit}", "--prompt", "5000", "--quiet"], "5000"),
    "malformed saved ditcache config": (["generate", "--model", "{tmp}/saved", "--prompt", "1"], "ditcache_config.json"),
    "saved ditcache config is a folder": (["generate", "--model", "{tmp}/folder_config", "--prompt", "1"], "ditcache_config.json"),
    "bench option the method does not take": (["bench", "--methods", "ditcache:0.2:tol=0.5"], "ditcache:0.2:tol=0.5"),
    "bench ToCa+ToMe on Wan": (["bench", "--model", "wan", "--methods", "toca:2:0.5+tome:0.5"], "ToMe"),
    "sweep config is a list": (["sweep", "{tmp}/list.yaml", "--output", "{tmp}/out"], "list.yaml"),
    "sweep config is empty": (["sweep", "{tmp}/empty.yaml", "--output", "{tmp}/out"], "empty.yaml"),
    "sweep prompts file missing": (["sweep", "{tmp}/no_prompts.yaml", "--output", "{tmp}/out"], "missing.txt"),
    "sweep pipeline folder missing": (["sweep", "{tmp}/no_pipeline.yaml", "--output", "{tmp}/out"], "no/such/pipeline"),
    "sweep dtype unknown": (["sweep", "{tmp}/bad_dtype.yaml", "--output", "{tmp}/out"], "dtype"),
    "sweep call not a mapping": (["sweep", "{tmp}/bad_call.yaml", "--output", "{tmp}/out"], "call"),
    "sweep output is a file": (["sweep", "{tmp}/good.yaml", "--output", "{tmp}/good.yaml"], "--output"),
}
SWEEP_FILES = {
    "bad.yaml": "pipeline: tiny-flux\nsteps: two\nprompts: [a cat]\n",
    "list.yaml": "- pipeline: tiny-flux\n",
    "empty.yaml": "",
    "no_prompts.yaml": "pipeline: tiny-flux\nmethods: [fora:2]\nprompts: missing.txt\n",
    "no_pipeline.yaml": "pipeline: no/such/pipeline\nmethods: [fora:2]\nprompts: [a cat]\n",
    "bad_dtype.yaml": "pipeline: tiny-flux\nmethods: [fora:2]\nprompts: [a cat]\ndtype: bogus\n",
    "bad_call.yaml": "pipeline: tiny-flux\nmethods: [fora:2]\nprompts: [a cat]\ncall: 3\n",
    "good.yaml": "pipeline: tiny-flux\nmethods: [fora:2]\nprompts: [a cat]\nsteps: 2\n",
}


@pytest.mark.parametrize("case", sorted(MISTAKES))
def test_a_mistake_ends_in_one_line_and_status_2(case, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    for name, text in SWEEP_FILES.items():
        (tmp_path / name).write_text(text)
    dit = digits.reference_pipeline_path("digits-dit")
    for folder, config in (("saved", "{not json"), ("folder_config", None)):
        shutil.copytree(dit, tmp_path / folder, ignore=shutil.ignore_patterns("*.safetensors"))
        (tmp_path / folder / "ditcache_config.json").mkdir() if config is None else (tmp_path / folder / "ditcache_config.json").write_text(config)
    argv, named = MISTAKES[case]
    status, out, err = run_command([arg.format(tmp=tmp_path, dit=dit) for arg in argv], capsys)
    assert status == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert named in err
    assert not list(tmp_path.glob("*.png"))  # nothing was generated


def test_mp4_without_a_video_writer_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    real = generate_module.importlib.util.find_spec
    monkeypatch.setattr(generate_module.importlib.util, "find_spec", lambda name: None if name.startswith("imageio") else real(name))
    status, _, err = run_command(["generate", "--out", "fox.mp4"], capsys)
    assert status == 2 and "ditcache[video]" in err and len(err.strip().splitlines()) == 1


def test_the_real_entry_point_prints_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ditcache", "generate", "--cache-ratio", "1.5"], cwd=tmp_path,
                            env=OFFLINE, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == "ditcache generate: error: `cache_ratio` must be a number in [0.0, 1.0], got 1.5."


def test_help_loads_neither_torch_nor_diffusers(tmp_path):
    code = (
        "import sys\nfrom ditcache.cli import main\n"
        "for command in ([], ['generate'], ['bench'], ['sweep'], ['eval']):\n"
        "    try:\n        main([*command, '--help'])\n    except SystemExit:\n        pass\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=OFFLINE, capture_output=True, text=True, check=True)
    assert result.stdout.strip().endswith("[]"), result.stdout[-300:]
    assert "usage: ditcache bench" in result.stdout and "usage: ditcache generate" in result.stdout
    for option in ("--seed", "--device", "--methods", "--method", "--guidance-scale", "--negative-prompt", "--repeats"):
        assert option in result.stdout


def test_lazy_names_are_the_modules_names():
    from ditcache import config, hooks

    assert ditcache.ToCaConfig is config.ToCaConfig and ditcache.apply_cache is hooks.apply_cache
    assert set(ditcache.__all__) <= set(dir(ditcache))
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        ditcache.nothing  # noqa: B018


def test_compare_warms_up_alternates_and_labels_the_grid(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    calls = []
    original = generate_module._timed_call

    def recording(*args, **cache):
        calls.append(cache.get("cache", True))
        return original(*args, **cache)

    monkeypatch.setattr(generate_module, "_timed_call", recording)
    argv = ["generate", "--prompt", "a handwritten digit one", "a handwritten digit two", "--steps", "4", "--compare",
            "--repeats", "2", "--out", "digits.png", "--quiet", "--method", "fora-taylor", "--guidance-scale", "2"]
    status, out, _ = run_command(argv, capsys)
    assert status == 0
    assert calls == [False, True, False, True, False, True]  # one warm-up each, then alternating
    assert "median of 2 warm runs" in out and "x in time per call" in out and "inside the transformer" in out and "x in transformer FLOPs" in out
    grid = Image.open(tmp_path / "digits.png")
    assert grid.height == 2 * 128 and grid.width > 2 * 128  # two enlarged rows, a label column
    label = grid.crop((0, 0, grid.width - 2 * 128, grid.height)).convert("L")
    assert label.getextrema()[0] < 128  # text drawn in the label column


def test_psnr_of_identical_images_says_identical():
    image = Image.new("RGB", (4, 4), "red")
    assert generate_module.psnr_text([image], [image]) == "identical"
    assert generate_module.psnr_text([image], [Image.new("RGB", (4, 4), "blue")]).endswith(" dB")


def test_entropy_score_on_flux_is_refused_when_applied(flux_pipe):
    with pytest.raises(ValueError, match="cross_attention_entropy.*FLUX"):
        ditcache.apply_cache(flux_pipe, ditcache.ToCaConfig(score="cross_attention_entropy"))
    assert not hasattr(flux_pipe.transformer, "_diffusers_hook")  # nothing was attached


def test_a_transformer_with_diffusers_cache_is_refused(flux_pipe):
    from diffusers import FirstBlockCacheConfig

    inputs = dict(prompt="a cat", num_inference_steps=5, height=16, width=16, output_type="np")
    flux_pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    with pytest.raises(RuntimeError, match="fbc_"):
        ditcache.apply_cache(flux_pipe, ditcache.ToCaConfig())
    flux_pipe.transformer.disable_cache()
    ditcache.apply_cache(flux_pipe, ditcache.ToCaConfig(cache_interval=2))
    flux_pipe(**inputs, generator=torch.Generator().manual_seed(0))
    assert ditcache.cache_stats(flux_pipe).partial_steps == 1  # steps 0-2 and 4 full (the FLUX preset)
