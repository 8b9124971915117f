"""The feature cache: build it once per (dataset, split, backbone, transform), read it everywhere."""

from protoquant.cache.build import build_cache, cache_key
from protoquant.cache.store import FeatureStore
from protoquant.cache.view import CacheView

__all__ = ["CacheView", "FeatureStore", "build_cache", "cache_key"]
