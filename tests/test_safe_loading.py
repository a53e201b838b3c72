"""Every checkpoint the evaluation reads loads with ``weights_only=True`` (or as safetensors), including what
torch-fidelity, torchmetrics, transformers and the official VBench load for us: a pickle planted where the
weights are looked up is refused and never runs its code."""

import json
import math
import pickle
from pathlib import Path

import pytest
import torch

from ditcache.eval import builders, metrics, weights
from ditcache.eval import vbench as V
from ditcache.eval.image_reward import ImageReward


class PlantedPayload:
    """Creates ``marker`` when a full unpickler loads it: the code a planted checkpoint would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def plant(file: Path, marker: Path) -> Path:
    """A checkpoint that looks like a state dict but runs code when fully unpickled."""
    file.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"weight": torch.zeros(2), "payload": PlantedPayload(marker)}, file)
    return file


def assert_refused_without_running(load, marker: Path, error=pickle.UnpicklingError):
    with pytest.raises(Exception) as raised:
        load()
    assert not marker.exists(), "the planted pickle ran its code"
    assert isinstance(raised.value, error), f"refused with {raised.value!r}"


SOURCES = ("argument", "environment", "cache")


def place_file(name: str, source: str, marker: Path, monkeypatch, tmp_path) -> Path | None:
    """Plants the file of URL weights ``name`` where ``source`` says; returns the path argument to pass, if any."""
    spec = weights.WEIGHTS[name]
    monkeypatch.delenv(spec.env, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    if source == "cache":
        plant(tmp_path / "torch" / "hub" / "checkpoints" / spec.url.rsplit("/", 1)[-1], marker)
        return None
    file = plant(tmp_path / "planted.pth", marker)
    if source == "environment":
        monkeypatch.setenv(spec.env, str(file))
        return None
    return file


def place_folder(name: str, source: str, files: dict[str, object], monkeypatch, tmp_path) -> Path | None:
    """Writes a folder of hub weights ``name`` (bytes or JSON per file) where ``source`` says."""
    from huggingface_hub import constants

    spec = weights.WEIGHTS[name]
    monkeypatch.delenv(spec.env, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    if source == "cache":
        repo = tmp_path / "hub" / ("models--" + spec.hub_repo.replace("/", "--"))
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text("0123abc")
        folder = repo / "snapshots" / "0123abc"
    else:
        folder = tmp_path / "planted"
    folder.mkdir(parents=True)
    for file_name, content in files.items():
        (folder / file_name).write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    if source == "environment":
        monkeypatch.setenv(spec.env, str(folder))
    return folder if source == "argument" else None


# -- URL weights: the FID/KID Inception and the LPIPS AlexNet -------------------------------------
URL_LOADERS = {
    "inception": lambda path: metrics.feature_distances(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8), weights_path=path),
    "lpips-alexnet": lambda path: metrics.LPIPS(path),
}


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("name", URL_LOADERS)
def test_a_planted_weights_file_is_refused_without_running_its_code(name, source, monkeypatch, tmp_path):
    marker = tmp_path / "marker"
    path = place_file(name, source, marker, monkeypatch, tmp_path)
    assert_refused_without_running(lambda: URL_LOADERS[name](path), marker, weights.UnsafeCheckpointError)


def test_lpips_reads_torchmetrics_linear_heads_safely():
    """The heads come from torchmetrics' own file; loaded here with weights_only=True, they equal torchmetrics' load."""
    from torchmetrics.functional.image.lpips import _LPIPS

    reference = _LPIPS(pretrained=True, net="alex", pnet_rand=True)
    ours = metrics.LPIPS(random_backbone=True).lpips
    for head, reference_head in zip(ours.lins, reference.lins):
        assert torch.equal(head.model[1].weight, reference_head.model[1].weight)


# -- hub folders: ImageReward, and the transformers models of CLIP score and VBench ---------------
@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A tiny CLIP folder (config, tokenizer, processor) whose weights the tests replace."""
    folder = builders.clip_model(tmp_path_factory.mktemp("clip"))
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file() and path.suffix != ".safetensors"}


@pytest.mark.parametrize("source", SOURCES)
def test_a_planted_image_reward_checkpoint_is_refused_without_running_its_code(source, monkeypatch, tmp_path):
    marker = tmp_path / "marker"
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a"]) + "\n")
    checkpoint = plant(tmp_path / "ImageReward.pt", marker).read_bytes()
    path = place_folder("image-reward", source, {"ImageReward.pt": checkpoint, "med_config.json": {}}, monkeypatch, tmp_path)
    load = lambda: ImageReward.from_pretrained(path and str(path), tokenizer_path=str(tokenizer))  # noqa: E731
    assert_refused_without_running(load, marker, weights.UnsafeCheckpointError)


def dino_config() -> dict:
    from transformers import ViTConfig

    return ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).to_dict()


HUB_LOADERS = {
    "clip-vit-large-patch14": lambda path: metrics.CLIPScorer.from_pretrained(path),
    "dino-vitb16": lambda path: V.SubjectConsistency(path, device="cpu"),
    "clip-vit-base-patch32": lambda path: V.BackgroundConsistency(path, device="cpu"),
}


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("name", HUB_LOADERS)
def test_a_planted_transformers_checkpoint_is_refused_without_running_its_code(
    name, source, clip_folder, monkeypatch, tmp_path
):
    """transformers reads a ``pytorch_model.bin`` with weights_only=True: the folder's pickle never runs."""
    marker = tmp_path / "marker"
    files = {"config.json": dino_config()} if name == "dino-vitb16" else dict(clip_folder)
    files["pytorch_model.bin"] = plant(tmp_path / "pytorch_model.bin", marker).read_bytes()
    path = place_folder(name, source, files, monkeypatch, tmp_path)
    assert_refused_without_running(lambda: HUB_LOADERS[name](path), marker)


# -- the official VBench, which loads its checkpoints itself in a child process -------------------
def test_the_official_vbench_refuses_a_planted_checkpoint_that_it_loads_with_weights_only_false(
    tmp_path, monkeypatch, stand_in_vbench
):
    """A stand-in vbench package that loads a checkpoint as VBench's dependencies may: weights_only=False."""
    marker = tmp_path / "marker"
    stand_in_vbench(
        "import os, torch\n"
        "class VBench:\n"
        "    def __init__(self, device, full_info_dir, output_path):\n"
        "        pass\n"
        "    def evaluate(self, videos_path, name, dimension_list=None, mode=None):\n"
        "        torch.load(os.environ['PLANTED_CHECKPOINT'], weights_only=False)\n"
    )
    monkeypatch.setenv("PLANTED_CHECKPOINT", str(plant(tmp_path / "planted.pth", marker)))
    run = lambda: V.run_official_vbench(tmp_path / "videos", ["subject_consistency"], tmp_path / "out", device="cpu")  # noqa: E731
    assert_refused_without_running(run, marker, RuntimeError)


# -- the FID/KID Inception loaded safely computes what torchmetrics computes ----------------------
@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """Random Inception weights of the released shapes and key names (torchvision's layout, 1008 classes)."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    state_dict = model.state_dict()
    for key, value in state_dict.items():  # batch norms that do something
        if key.endswith("running_mean"):
            value.normal_(0, 0.1)
        elif key.endswith("running_var"):
            value.uniform_(0.5, 2)
    file = tmp_path_factory.mktemp("inception") / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(state_dict, file)
    return file


def test_safely_loaded_inception_features_equal_torchmetrics_own(inception_file):
    from torchmetrics.image.fid import FrechetInceptionDistance

    image = torch.rand(1, 3, 24, 40, generator=torch.Generator().manual_seed(0))
    # torchmetrics' own loading (weights_only=False in torch-fidelity) of a file written by this test
    reference = FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=str(inception_file))
    with torch.no_grad():
        expected = reference.inception((image * 255).byte())
        assert expected.shape == (1, 2048) and expected.std() > 0
        assert torch.equal(metrics.InceptionFeatures(2048, inception_file)(image), expected)


def test_fid_with_safely_loaded_inception_equals_torchmetrics_fid(inception_file, monkeypatch):
    """The same FID as torchmetrics with ``feature=64`` and the same file; KID, which torchmetrics cannot give a
    weights file, gets the same features."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    generator = torch.Generator().manual_seed(1)
    images, references = torch.rand(3, 3, 16, 16, generator=generator), torch.rand(3, 3, 16, 16, generator=generator)
    reference = FrechetInceptionDistance(feature=64, normalize=True, feature_extractor_weights_path=str(inception_file))
    reference.update(references, real=True)
    reference.update(images, real=False)
    monkeypatch.setenv("DITCACHE_INCEPTION_WEIGHTS", str(inception_file))
    result = metrics.feature_distances(images, references, feature=64, kid_subset_size=3)
    assert result["fid"] == float(reference.compute()) > 0
    assert math.isfinite(result["kid_mean"]) and math.isfinite(result["kid_std"])
