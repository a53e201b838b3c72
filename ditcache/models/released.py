"""Loading checkpoints released in a transformers layout (``config.json`` + ``model.safetensors``, the
models' own key names) into the diffusers models here, beside their diffusers layout."""

from __future__ import annotations

import os
from pathlib import Path

RELEASED_WEIGHTS = "model.safetensors"


class ReleasedCheckpointMixin:
    """``from_pretrained`` for a ``ModelMixin`` that also reads its released layout; the class builds
    itself from the released ``config.json`` in :meth:`from_released_config`."""

    @classmethod
    def from_released_config(cls, config: dict):
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args, **kwargs):
        """Load a diffusers-format folder or repository, or the released layout (hub id or folder)."""
        weights = released_weights(pretrained_model_name_or_path, kwargs)
        if weights is None:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        from safetensors.torch import load_file

        model = cls.from_released_config(cls.load_config(Path(weights).parent))
        model.load_state_dict(load_file(weights), strict=True)
        dtype = kwargs.get("torch_dtype", kwargs.get("dtype"))
        return model.to(dtype) if dtype is not None else model


def released_weights(name_or_path: str | os.PathLike, kwargs: dict) -> str | None:
    """The released layout's weights file, or None when ``name_or_path`` is in the diffusers layout."""
    subfolder = kwargs.get("subfolder") or ""
    local = Path(name_or_path) / subfolder
    if local.is_dir():
        released = local / RELEASED_WEIGHTS
        diffusers_weights = any(local.glob("diffusion_pytorch_model*"))
        return str(released) if released.exists() and not diffusers_weights else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError

    hub = {key: kwargs[key] for key in ("cache_dir", "revision", "token", "local_files_only") if key in kwargs}
    try:
        hf_hub_download(str(name_or_path), "config.json", subfolder=subfolder or None, **hub)
        return hf_hub_download(str(name_or_path), RELEASED_WEIGHTS, subfolder=subfolder or None, **hub)
    except EntryNotFoundError:
        return None
