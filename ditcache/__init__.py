"""ditcache: token-wise feature caching (ToCa) and layer caching (FORA) for diffusers' DiTs."""

from .config import FORAConfig, ToCaConfig, ToMeConfig, preset
from .hooks import apply_cache, cache_config, cache_stats, record_selections, remove_cache
from .state import CacheStats, SelectionEvent

__all__ = [
    "ToCaConfig",
    "FORAConfig",
    "ToMeConfig",
    "preset",
    "CacheStats",
    "apply_cache",
    "remove_cache",
    "cache_stats",
    "cache_config",
    "record_selections",
    "SelectionEvent",
    "ToCaPipeline",
    "OpenSoraPipeline",
    "STDiT3Model",
    "OpenSoraVAE",
]


def __getattr__(name: str):
    # ``ditcache.ToCaPipeline`` is re-exported lazily: the core itself never depends on ``pipelines``.
    if name == "ToCaPipeline":
        from .pipelines import ToCaPipeline

        return ToCaPipeline
    if name == "OpenSoraPipeline":
        from .pipelines.opensora import OpenSoraPipeline

        return OpenSoraPipeline
    if name in ("STDiT3Model", "OpenSoraVAE"):  # diffusers finds a saved component's class here
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module 'ditcache' has no attribute {name!r}")
__version__ = "0.1.0"
