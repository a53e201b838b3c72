"""Where the evaluation metrics find their weights, without ever downloading at run time.

Each metric's weights are a :class:`WeightSpec`. They are looked up, in order, at an explicit path, at the
path in the spec's environment variable, and in the standard caches: the torch hub cache
(``$TORCH_HOME/hub/checkpoints``) for files that torch or torchvision download from a URL, and the
Hugging Face cache (``$HF_HOME/hub``) for hub repositories. ``ditcache eval check`` lists what is found
and what is missing; ``ditcache eval fetch`` downloads the missing ones on a machine that is online.

Checkpoints found there load as safetensors or with ``weights_only=True`` (:func:`load_checkpoint` here, transformers
for hub folders), never unpickled in full: a pickle put at any of these places would otherwise run its code.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch


class MissingWeightsError(FileNotFoundError):
    """A metric's weights are not on this machine; the message says which file and where to put it."""


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint holds pickled objects other than tensors and plain containers, which could run code when loaded."""


@dataclass(frozen=True)
class WeightSpec:
    """The weights one or more metrics need.

    Args:
        name: key used by ``ditcache eval check/fetch`` and in error messages.
        used_by: the metrics that need it.
        env: environment variable that may hold a path (a file for ``url`` specs, a folder for hub specs).
        url: a single file that torch hub downloads into ``$TORCH_HOME/hub/checkpoints``.
        hub_repo: a Hugging Face repository, found in the hub cache.
        hub_files: the files of ``hub_repo`` that are needed (all of them when empty).
    """

    name: str
    used_by: tuple[str, ...]
    env: str
    url: str | None = None
    hub_repo: str | None = None
    hub_files: tuple[str, ...] = ()

    @property
    def cache_path(self) -> str:
        """Where the standard cache keeps it, for messages."""
        if self.url:
            return str(Path(torch.hub.get_dir()) / "checkpoints" / self.url.rsplit("/", 1)[-1])
        return f"the Hugging Face cache ({_hf_cache()}) as {self.hub_repo}"


WEIGHTS: dict[str, WeightSpec] = {
    spec.name: spec
    for spec in (
        WeightSpec(
            "inception",
            ("fid", "kid"),
            "DITCACHE_INCEPTION_WEIGHTS",
            url="https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
        ),
        WeightSpec("lpips-alexnet", ("lpips",), "DITCACHE_LPIPS_WEIGHTS", url="https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
        WeightSpec(
            "clip-vit-large-patch14",
            ("clip_score",),
            "DITCACHE_CLIP_MODEL",
            hub_repo="openai/clip-vit-large-patch14",
            hub_files=("config.json", "model.safetensors", "tokenizer*", "vocab.json", "merges.txt", "special_tokens_map.json", "preprocessor_config.json"),
        ),
        WeightSpec(
            "image-reward",
            ("image_reward",),
            "DITCACHE_IMAGE_REWARD",
            hub_repo="THUDM/ImageReward",
            hub_files=("ImageReward.pt", "med_config.json"),
        ),
        WeightSpec(
            "bert-base-uncased",
            ("image_reward",),
            "DITCACHE_BERT_TOKENIZER",
            hub_repo="google-bert/bert-base-uncased",
            hub_files=("vocab.txt", "tokenizer_config.json", "tokenizer.json", "config.json"),
        ),
        WeightSpec(
            "dino-vitb16",
            ("subject_consistency",),
            "DITCACHE_DINO_MODEL",
            hub_repo="facebook/dino-vitb16",
            hub_files=("config.json", "model.safetensors", "preprocessor_config.json"),
        ),
        WeightSpec(
            "clip-vit-base-patch32",
            ("background_consistency",),
            "DITCACHE_CLIP_B32_MODEL",
            hub_repo="openai/clip-vit-base-patch32",
            hub_files=("config.json", "model.safetensors", "preprocessor_config.json"),
        ),
    )
}


def _hf_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _cached_hub_folder(spec: WeightSpec) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(spec.hub_repo, local_files_only=True, allow_patterns=list(spec.hub_files) or None))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        return None
    return folder if any(folder.iterdir()) else None


def find_weights(name: str, path: str | os.PathLike | None = None) -> Path | None:
    """The local path of weights ``name`` (a file for URL weights, a folder for hub weights), or None."""
    spec = WEIGHTS[name]
    for candidate in (path, os.environ.get(spec.env)):
        if candidate:
            return Path(candidate) if Path(candidate).exists() else None
    if spec.url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / spec.url.rsplit("/", 1)[-1]
        return cached if cached.exists() else None
    return _cached_hub_folder(spec)


def require_weights(name: str, path: str | os.PathLike | None = None) -> Path:
    """Like :func:`find_weights`, but a missing file raises :class:`MissingWeightsError` saying where to put it."""
    found = find_weights(name, path)
    if found is not None:
        return found
    spec = WEIGHTS[name]
    given = path or os.environ.get(spec.env)
    where = f"{given!s} does not exist. " if given else ""
    source = spec.url or f"https://huggingface.co/{spec.hub_repo}"
    raise MissingWeightsError(
        f"{where}The {'/'.join(spec.used_by)} metric needs the {name} weights ({source}). Put them at "
        f"{spec.cache_path}, or point {spec.env} at a local copy, or run `ditcache eval fetch {name}` on a machine "
        "that is online."
    )


def load_checkpoint(file: str | os.PathLike) -> dict:
    """``torch.load(file, weights_only=True)`` onto the CPU: tensors and plain containers, nothing that runs code.

    Raises:
        UnsafeCheckpointError: the file holds anything else, as a pickle planted at a weights path would.
    """
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(
            f"{file} holds pickled objects besides tensors (torch.load with weights_only=True refused it, see above), "
            "so it was not loaded: unpickling them could run code. Replace it with the released weights."
        ) from error


def check() -> list[tuple[WeightSpec, Path | None]]:
    """Every spec with its local path (None when missing). Never downloads."""
    return [(spec, find_weights(spec.name)) for spec in WEIGHTS.values()]


def fetch(names: list[str] | None = None) -> dict[str, Path]:
    """Download the named weights (all when None) into the standard caches; needs the network."""
    fetched = {}
    for name in names or list(WEIGHTS):
        if name not in WEIGHTS:
            raise ValueError(f"unknown weights {name!r}; known: {', '.join(WEIGHTS)}")
        spec = WEIGHTS[name]
        if spec.url:
            target = Path(torch.hub.get_dir()) / "checkpoints" / spec.url.rsplit("/", 1)[-1]
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(spec.url, str(target))
            fetched[name] = target
        else:
            from huggingface_hub import snapshot_download

            fetched[name] = Path(snapshot_download(spec.hub_repo, allow_patterns=list(spec.hub_files) or None))
    return fetched


def main(action: str, names: list[str]) -> int:
    """``ditcache eval check`` (exit status 1 when weights are missing) / ``ditcache eval fetch [NAMES]``."""
    from ditcache.cli import CommandError

    if action == "fetch":
        unknown = sorted(set(names) - set(WEIGHTS))
        if unknown:
            raise CommandError(f"unknown weights {', '.join(unknown)}; known: {', '.join(WEIGHTS)}")
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no", "off"):
            raise CommandError("HF_HUB_OFFLINE is set: fetching downloads, so run it online without HF_HUB_OFFLINE")
        try:
            fetched = fetch(names or None)
        except OSError as error:  # no network: urllib's URLError, requests' and huggingface_hub's errors
            raise CommandError(f"download failed ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                               "`ditcache eval fetch` needs the network") from None
        for name, path in fetched.items():
            print(f"{name:<24} {path}")
        return 0
    missing = 0
    for spec, path in check():
        missing += path is None
        status = str(path) if path else f"MISSING: put it at {spec.cache_path} or set {spec.env}"
        print(f"{spec.name:<24} {', '.join(spec.used_by):<24} {status}")
    print(f"{missing} of {len(WEIGHTS)} missing; `ditcache eval fetch NAME` downloads one on a machine that is online.")
    return 1 if missing else 0
