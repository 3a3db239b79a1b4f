"""Pretrained weights: the registry of known files, the local cache and downloads."""

from crackjax.weights.entry import WeightsEntry, WeightsError, WeightsMissingError
from crackjax.weights.cache import cache_dir, cached_path, locate_weights

__all__ = [
    "WeightsEntry",
    "WeightsError",
    "WeightsMissingError",
    "cache_dir",
    "cached_path",
    "locate_weights",
]
