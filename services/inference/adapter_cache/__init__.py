"""The worker's adapter cache: host RAM and local disk tiers in front of the adapter store.

The device tier (slots in the engine process) reads `LoadedAdapter.weights` from here, handed over as
files (`engine_process/handoff.py`).
"""

from services.inference.adapter_cache.cache import AdapterCache, CacheEntry, CacheObserver
from services.inference.adapter_cache.config import CacheConfig
from services.inference.adapter_cache.errors import AdapterCorrupt
from services.inference.adapter_cache.key import AdapterKey
from services.inference.adapter_cache.loaded import LoadedAdapter, parse_adapter
from services.inference.adapter_cache.stats import CacheStats

__all__ = [
    "AdapterCache",
    "AdapterCorrupt",
    "AdapterKey",
    "CacheConfig",
    "CacheEntry",
    "CacheObserver",
    "CacheStats",
    "LoadedAdapter",
    "parse_adapter",
]
