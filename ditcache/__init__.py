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
]


def __getattr__(name: str):
    # ``ditcache.ToCaPipeline`` is re-exported lazily: the core itself never depends on ``pipelines``.
    if name == "ToCaPipeline":
        from .pipelines import ToCaPipeline

        return ToCaPipeline
    raise AttributeError(f"module 'ditcache' has no attribute {name!r}")
__version__ = "0.1.0"
