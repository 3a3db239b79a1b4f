"""The backbone contract: what the bottleneck stage needs to know about a network."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

Params = Any  # A nested dict of jnp/np arrays: {"params": ..., "batch_stats": ...}.


# Pixel scalings, named by what they map uint8 pixels to.
MINUS_ONE_TO_ONE = "minus_one_to_one"  # x / 127.5 - 1 (Keras "tf" mode, BiT, EfficientNet-Lite)
IMAGENET_MEAN_STD = "imagenet_mean_std"  # (x / 255 - mean) / std with the ImageNet mean and std

_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def scale_pixels(images: jnp.ndarray, scaling: str) -> jnp.ndarray:
    """Scale `(batch, height, width, 3) uint8` pixels to the float32 input a backbone expects."""
    x = images.astype(jnp.float32)
    if scaling == MINUS_ONE_TO_ONE:
        return x / 127.5 - 1.0
    if scaling == IMAGENET_MEAN_STD:
        return (x / 255.0 - _IMAGENET_MEAN) / _IMAGENET_STD
    raise ValueError(f"unknown pixel scaling {scaling!r}; expected {MINUS_ONE_TO_ONE!r} or {IMAGENET_MEAN_STD!r}")


@dataclasses.dataclass(frozen=True)
class Backbone:
    """A frozen feature extractor registered by name.

    `build()` returns a Flax module whose `__call__(x)` takes `(batch, input_size,
    input_size, 3) float32` scaled pixels (see `pixel_scaling`) and returns pooled
    features of shape `(batch, feature_size) float32`, with batch norm in inference
    mode. `load_params(path)` reads a weights file in its publisher's layout and
    returns the variables for `module.apply`. `weights` names the default entry
    of the weights registry (`crackjax.weights.registry`).
    """

    name: str
    input_size: int
    feature_size: int
    pixel_scaling: str
    build: Callable[[], nn.Module]
    load_params: Callable[[Path], Params]
    weights: str
    description: str = ""
