"""The worker's adapter cache: host RAM and local disk tiers in front of the adapter store.

The device tier (slots on the GPU) lives in the engine and reads `LoadedAdapter.weights` from here.
"""

from services.inference.adapter_cache.cache import AdapterCache, RefLike
from services.inference.adapter_cache.config import CacheConfig
from services.inference.adapter_cache.errors import AdapterCorrupt
from services.inference.adapter_cache.loaded import LoadedAdapter, adapter_key, parse_adapter
from services.inference.adapter_cache.stats import CacheStats

__all__ = [
    "AdapterCache",
    "AdapterCorrupt",
    "CacheConfig",
    "CacheStats",
    "LoadedAdapter",
    "RefLike",
    "adapter_key",
    "parse_adapter",
]
