"""``ToCaPipeline``: any supported diffusers pipeline, loaded with token-wise caching applied.

The returned object is the pipeline diffusers loads, moved to a subclass made for it alone
(``ToCaPipeline`` first, then the original class): ``isinstance`` holds for both, ``__call__`` keeps
the original signature plus three per-call keywords, and no class is modified, so other pipelines of
the same class in the process stay uncached.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import threading
import weakref
from pathlib import Path

from diffusers import DiffusionPipeline
from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card
from huggingface_hub import create_repo, upload_folder

from ditcache import CacheStats, FORAConfig, ToCaConfig, ToMeConfig, apply_cache, cache_config, cache_stats, remove_cache
from ditcache.adapters import transformer_adapter
from ditcache.adapters.generic import GenericTransformerAdapter
from ditcache.config import CacheConfig, config_from_dict, config_to_dict
from ditcache.specs import SPECS

CONFIG_FILE = "ditcache_config.json"
# One pipeline call at a time per transformer (pipelines made with from_pipe share it): a call swaps the
# transformer's config for its own, and a second call in between would run with, or restore, the wrong one.
_CALL_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CALL_LOCKS_GUARD = threading.Lock()
SUPPORTED_PIPELINES = tuple(pipeline for spec in SPECS.values() for pipeline in spec.pipelines)


def resolve_config(
    cache_interval: int | None = None,
    cache_ratio: float | None = None,
    cache_config: CacheConfig | list[CacheConfig] | None = None,
    tome_ratio: float | None = None,
) -> CacheConfig | list[CacheConfig]:
    """``cache_config`` (ToCa with the model's preset when None) with the shortcuts applied:
    ``cache_interval``/``cache_ratio`` to the caching config, ``tome_ratio`` to a ``ToMeConfig``
    (added when there is none)."""
    configs = list(cache_config) if isinstance(cache_config, (list, tuple)) else [cache_config or ToCaConfig()]
    caching = [c for c in configs if not isinstance(c, ToMeConfig)]
    merging = [c for c in configs if isinstance(c, ToMeConfig)]
    if caching:
        config = caching[0]
        if cache_ratio is not None and isinstance(config, FORAConfig):
            raise ValueError("`cache_ratio` does not apply to FORAConfig, which recomputes no token.")
        changes = {"cache_interval": cache_interval, "cache_ratio": cache_ratio}
        caching = [dataclasses.replace(config, **{k: v for k, v in changes.items() if v is not None}), *caching[1:]]
    elif cache_interval is not None or cache_ratio is not None:
        raise ValueError("`cache_interval` and `cache_ratio` need a ToCaConfig or FORAConfig in `cache_config`.")
    if tome_ratio is not None:
        merging = [dataclasses.replace(merging[0], ratio=tome_ratio) if merging else ToMeConfig(ratio=tome_ratio), *merging[1:]]
    resolved = caching + merging
    return resolved[0] if len(resolved) == 1 else resolved


class ToCaPipeline(DiffusionPipeline):
    """Load a diffusers pipeline with ToCa (or FORA) caching on its transformer.

    ``ToCaPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", dtype=torch.bfloat16,
    cache_interval=4, cache_ratio=0.9)`` returns a ``FluxPipeline`` that is also a ``ToCaPipeline``.
    Calls accept ``cache_interval=``, ``cache_ratio=`` (that call only) and ``cache=False`` (that call
    uncached); ``pipe.cache_stats`` describes the last call.
    """

    def __new__(cls, *args, **kwargs):
        if cls is ToCaPipeline:
            raise TypeError("ToCaPipeline wraps a loaded pipeline: use ToCaPipeline.from_pretrained(...) or .from_pipe(pipe).")
        return super().__new__(cls)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        cache_interval: int | None = None,
        cache_ratio: float | None = None,
        cache_config: CacheConfig | list[CacheConfig] | None = None,
        tome_ratio: float | None = None,
        **kwargs,
    ) -> "ToCaPipeline":
        """Load with ``DiffusionPipeline.from_pretrained`` (hub id or folder; ``kwargs`` go there) and
        apply caching (and token merging with ``tome_ratio``). Settings not given come from a
        ``ditcache_config.json`` saved in a local folder, then from the model family's preset."""
        saved = Path(pretrained_model_name_or_path) / CONFIG_FILE
        if cache_config is None and saved.exists():
            cache_config = read_config(saved)
        config = resolve_config(cache_interval, cache_ratio, cache_config, tome_ratio)  # bad settings fail before loading
        loader = pipeline_loader(pretrained_model_name_or_path, kwargs)
        pipeline = loader.from_pretrained(pretrained_model_name_or_path, **kwargs)
        if cache_config is None:
            config = resolve_config(cache_interval, cache_ratio, default_config(pipeline), tome_ratio)
        return cls.attach(pipeline, config)

    @classmethod
    def from_pipe(
        cls,
        pipeline: DiffusionPipeline,
        cache_interval: int | None = None,
        cache_ratio: float | None = None,
        cache_config: CacheConfig | list[CacheConfig] | None = None,
        pipeline_class: type[DiffusionPipeline] | None = None,
        tome_ratio: float | None = None,
        **kwargs,
    ) -> "ToCaPipeline":
        """A cached pipeline built from ``pipeline``'s components (``pipeline_class`` switches task,
        e.g. to ``FluxImg2ImgPipeline``).

        The components are shared, not copied, and the cache lives on the shared transformer: from
        then on ``pipeline`` runs cached too (with the new pipeline's settings), and ``remove_cache``
        on either restores both. To keep ``pipeline`` uncached, pass
        ``transformer=copy.deepcopy(pipeline.transformer)`` (at the cost of a second copy of the weights).
        """
        target = pipeline_class or _original_class(type(pipeline))
        if "dtype" not in kwargs and "torch_dtype" not in kwargs:
            kwargs["dtype"] = pipeline.dtype  # diffusers would cast the shared components to float32
        if cache_config is None and isinstance(pipeline, ToCaPipeline):
            cache_config = pipeline.cache_config
        config = resolve_config(cache_interval, cache_ratio, cache_config or default_config(pipeline), tome_ratio)
        return cls.attach(target.from_pipe(pipeline, **kwargs), config)

    @classmethod
    def attach(cls, pipeline: DiffusionPipeline, config: CacheConfig | list[CacheConfig]) -> "ToCaPipeline":
        """Turn a loaded ``pipeline`` into a cached one, in place."""
        original = _original_class(type(pipeline))
        if default_config(pipeline) is None:
            raise TypeError(
                f"ToCaPipeline does not support {original.__name__}; supported pipelines: {', '.join(SUPPORTED_PIPELINES)} "
                "(any pipeline whose transformer ditcache supports, called the standard way)."
            )
        apply_cache(pipeline, config)
        pipeline.__class__ = _cached_class(original)
        pipeline._ditcache_config = config
        pipeline._ditcache_stats = None
        return pipeline

    @property
    def cache_config(self) -> CacheConfig | list[CacheConfig]:
        return self._ditcache_config

    @property
    def cache_stats(self) -> CacheStats | None:
        """Statistics of the last call (None after an uncached call)."""
        return self._ditcache_stats

    def save_pretrained(self, save_directory: str | Path, *args, push_to_hub: bool = False, **kwargs) -> None:
        """Save as the original pipeline (plain diffusers loads the folder), plus the cache settings
        in ``ditcache_config.json`` for ``ToCaPipeline.from_pretrained``. The settings are serialised
        before any weight is written, a stale copy is removed, and they are written last and atomically:
        a failed save leaves no folder that claims them. With ``push_to_hub=True`` (and diffusers' hub
        keywords: ``repo_id``, ``commit_message``, ``private``, ``create_pr``, ``token``) the folder is
        uploaded once it is complete, settings included (diffusers' own push would upload before them)."""
        hub = {key: kwargs.pop(key) for key in ("repo_id", "commit_message", "private", "create_pr", "token") if key in kwargs}
        text = json.dumps(config_to_dict(self._ditcache_config), indent=2)
        path = Path(save_directory) / CONFIG_FILE
        path.unlink(missing_ok=True)
        super().save_pretrained(save_directory, *args, **kwargs)
        _write_atomically(path, text)
        if push_to_hub:
            _upload(Path(save_directory), **hub)

    def _cached_call(self, original_call, args, kwargs, cache_interval, cache_ratio, cache):
        """Run with this pipeline's config (and the call's changes) on the transformer, then leave the
        transformer carrying exactly what it carried before: another pipeline sharing it (``from_pipe``)
        keeps its own settings, and a removed cache is never put back silently."""
        carried = cache_config(self)
        if cache and carried is None:
            raise RuntimeError(
                "ditcache was removed from this pipeline's transformer (ditcache.remove_cache): call "
                "ditcache.apply_cache(pipe, pipe.cache_config) to cache it again, or pass cache=False."
            )
        wanted = resolve_config(cache_interval, cache_ratio, self._ditcache_config) if cache else None
        with _CALL_LOCKS_GUARD:
            lock = _CALL_LOCKS.setdefault(self.transformer, threading.Lock())
        if not lock.acquire(blocking=False):
            raise RuntimeError(
                "another call is running on this pipeline's transformer (from another thread, or through a pipeline "
                "that shares it via from_pipe): a cached transformer serves one pipeline call at a time. Give each "
                "thread its own pipeline."
            )
        try:
            carried = cache_config(self)  # read again under the lock
            swapped = wanted != carried
            if swapped:
                remove_cache(self) if wanted is None else apply_cache(self, wanted)
            try:
                output = original_call(self, *args, **kwargs)
                self._ditcache_stats = cache_stats(self) if cache else None
                return output
            finally:
                if swapped:
                    apply_cache(self, carried) if carried is not None else remove_cache(self)
        finally:
            lock.release()


def read_config(path: Path) -> CacheConfig | list[CacheConfig]:
    """The settings saved in ``path``; a malformed file (or a folder by that name) raises a ``ValueError`` that
    names it."""
    if not path.is_file():
        raise ValueError(f"{path} is not a file: a saved ditcache config is a JSON file")
    try:
        return config_from_dict(json.loads(path.read_text()))
    except ValueError as error:  # invalid JSON or UTF-8 included
        raise ValueError(f"{path} is not a valid ditcache config: {error}") from error


def _write_atomically(path: Path, text: str) -> None:
    """Write a temporary file next to ``path``, then rename it over ``path``: a crash leaves the old
    file or the new one, never part of one."""
    temporary = path.with_name(f"{path.stem}.{os.getpid()}{path.suffix}.tmp")  # *.json.tmp: git-ignored
    try:
        with open(temporary, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _upload(folder: Path, repo_id: str | None = None, commit_message: str | None = None, private: bool | None = None,
            create_pr: bool = False, token: str | None = None) -> None:
    """Upload a saved pipeline folder as diffusers' ``push_to_hub`` does: the repository (by default the
    folder's name) made if needed, a model card, then the whole folder."""
    repo_id = create_repo(repo_id or folder.name, exist_ok=True, private=private, token=token).repo_id
    card = populate_model_card(load_or_create_model_card(repo_id, token=token, is_pipeline=True))
    card.save(folder / "README.md")
    upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message or "Upload pipeline with ditcache settings",
                  token=token, create_pr=create_pr)


def default_config(pipeline: DiffusionPipeline) -> CacheConfig | None:
    """What a pipeline is cached with when no config is given: ToCa where its transformer has a
    token-wise path, FORA on the generic path; None when ditcache does not support its transformer."""
    try:
        model = transformer_adapter(getattr(pipeline, "transformer", None))
    except TypeError:
        return None
    return FORAConfig() if isinstance(model, GenericTransformerAdapter) else ToCaConfig()


def pipeline_loader(pretrained_model_name_or_path, kwargs: dict | None = None) -> type[DiffusionPipeline]:
    """``OpenSoraPipeline`` for its folders (diffusers looks pipeline classes up in its own package),
    ``DiffusionPipeline`` otherwise."""
    hub = {key: value for key, value in (kwargs or {}).items() if key in ("cache_dir", "revision", "token", "local_files_only")}
    try:
        name = DiffusionPipeline.load_config(pretrained_model_name_or_path, **hub).get("_class_name")
    except (OSError, ValueError):  # no model_index.json: let diffusers report it
        return DiffusionPipeline
    if name == "OpenSoraPipeline":
        from .opensora import OpenSoraPipeline

        return OpenSoraPipeline
    return DiffusionPipeline


def _original_class(cls: type) -> type:
    return cls.__dict__.get("_ditcache_original", cls)


@functools.cache
def _cached_class(original: type) -> type:
    """The subclass ``(ToCaPipeline, original)`` with the original's name, so that saved folders
    name the original class."""
    original_call = original.__call__

    @functools.wraps(original_call)
    def __call__(self, *args, cache_interval: int | None = None, cache_ratio: float | None = None, cache: bool = True, **kwargs):
        return self._cached_call(original_call, args, kwargs, cache_interval, cache_ratio, cache)

    signature = inspect.signature(original_call)
    params = list(signature.parameters.values())
    at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
    extra = [
        inspect.Parameter("cache_interval", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="int | None"),
        inspect.Parameter("cache_ratio", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="float | None"),
        inspect.Parameter("cache", inspect.Parameter.KEYWORD_ONLY, default=True, annotation="bool"),
    ]
    __call__.__signature__ = signature.replace(parameters=params[:at] + extra + params[at:])
    namespace = {"__call__": __call__, "__module__": original.__module__, "_ditcache_original": original}
    return type(original.__name__, (ToCaPipeline, original), namespace)
