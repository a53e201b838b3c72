"""ditcache: token-wise feature caching (ToCa) and layer caching (FORA) for diffusers' DiTs."""

from .config import FORAConfig, ToCaConfig
from .hooks import apply_cache, cache_config, cache_stats, remove_cache
from .state import CacheStats

__all__ = ["ToCaConfig", "FORAConfig", "CacheStats", "apply_cache", "remove_cache", "cache_stats", "cache_config"]
__version__ = "0.1.0"
