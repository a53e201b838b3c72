"""ditcache: token-wise feature caching (ToCa) and layer caching (FORA) for diffusers' DiTs.

Names are imported on first use, so that the ``ditcache`` command answers ``--help`` and argument
mistakes without loading torch and diffusers.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ToCaConfig": ".config",
    "FORAConfig": ".config",
    "ToMeConfig": ".config",
    "preset": ".config",
    "CacheStats": ".state",
    "SelectionEvent": ".state",
    "apply_cache": ".hooks",
    "remove_cache": ".hooks",
    "cache_stats": ".hooks",
    "cache_config": ".hooks",
    "record_selections": ".hooks",
    "estimate_cache_bytes": ".memory",
    # The core never depends on ``pipelines`` or ``models``; diffusers finds a saved component's class here.
    "ToCaPipeline": ".pipelines",
    "OpenSoraPipeline": ".pipelines",
    "STDiT3Model": ".models",
    "OpenSoraVAE": ".models",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ditcache' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
