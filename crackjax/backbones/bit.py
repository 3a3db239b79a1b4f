"""BiT (Big Transfer) ResNet-v2 backbones: GroupNorm, weight-standardized convolutions, pre-activation units.

The architecture follows the official JAX code, `bit_jax/models.py` in
github.com/google-research/big_transfer:

- Every convolution standardizes its kernel over (height, width, in_channels) to
  zero mean and unit variance, `(w - mean) / sqrt(var + 1e-10)`, and pads its input
  with zeros symmetrically by `(k - 1) // 2` before a VALID convolution.
- GroupNorm uses 32 groups and eps 1e-5.
- The root block is a 7x7 stride-2 convolution, then a 3x3 stride-2 max pool over
  an input padded by 1 with zeros (not -inf). No norm or ReLU sits between them.
- A unit is GroupNorm, ReLU and a 1x1 convolution (`a`), then the same with a 3x3
  convolution that carries the unit's stride (`b`), then with a 1x1 convolution to
  4x the width (`c`). The projection shortcut (`a/proj`), where present, is a 1x1
  convolution with the unit's stride applied to the pre-activated input of `a`.
- Stage 1 keeps the resolution and stages 2 to 4 start with stride 2.
- A final GroupNorm and ReLU precede global average pooling.

Submodule names follow the official `.npz` files, minus their `resnet/` prefix, so
the checkpoint maps onto the Flax variables by name: `root_block/standardized_conv2d/kernel`,
`block1/unit01/a/group_norm/gamma`, `block1/unit01/a/proj/standardized_conv2d/kernel`,
`group_norm/beta` and so on.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp

from crackjax.backbones.base import MINUS_ONE_TO_ONE, Backbone, Params
from crackjax.weights.bit_npz import load_bit_npz
from crackjax.weights.entry import WeightsEntry

WEIGHT_STANDARDIZATION_EPS = 1e-10
GROUP_NORM_EPS = 1e-5
GROUP_NORM_GROUPS = 32

# Units per stage for each depth, as in the official code.
BLOCK_SIZES = {
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
}

# timm 1.0.31 configures these checkpoints for 224x224 inputs scaled to [-1, 1]. BiT-HyperRule
# fine-tunes at other sizes, up to 480x480 (big_transfer README), and the network accepts
# any size because it ends in global average pooling.
INPUT_SIZE = 224

# BiT-S was pre-trained on ILSVRC-2012 (ImageNet-1k) and BiT-M on ImageNet-21k.
_PRETRAINING = {"S": "ILSVRC-2012 (ImageNet-1k)", "M": "ImageNet-21k"}


def _fixed_padding(kernel_size: int) -> tuple[int, int]:
    """Return the (before, after) zero padding that the official code applies for `kernel_size`."""
    total = kernel_size - 1
    return total // 2, total - total // 2


class StandardizedConv2d(nn.Module):
    """Bias-free convolution with a weight-standardized `(k, k, in, out)` kernel and fixed zero padding."""

    features: int
    kernel_size: int
    strides: int = 1

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kernel_shape = (self.kernel_size, self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", nn.initializers.he_normal(), kernel_shape, jnp.float32)

        mean = jnp.mean(kernel, axis=(0, 1, 2), keepdims=True)
        centered = kernel - mean
        variance = jnp.mean(jnp.square(centered), axis=(0, 1, 2), keepdims=True)
        kernel = centered / jnp.sqrt(variance + WEIGHT_STANDARDIZATION_EPS)

        padding = _fixed_padding(self.kernel_size)
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides=(self.strides, self.strides),
            padding=(padding, padding),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )


class GroupNorm(nn.Module):
    """GroupNorm over (height, width, channels in group) with per-channel `gamma` and `beta`.

    The parameter names and the `(channels,)` shapes are those of the BiT `.npz` files.
    """

    num_groups: int = GROUP_NORM_GROUPS
    eps: float = GROUP_NORM_EPS

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        batch, height, width, channels = x.shape
        if channels % self.num_groups:
            raise ValueError(f"GroupNorm needs channels divisible by {self.num_groups} groups, but got {channels} channels")

        grouped = x.reshape(batch, height, width, self.num_groups, channels // self.num_groups)
        mean = jnp.mean(grouped, axis=(1, 2, 4), keepdims=True)
        centered = grouped - mean
        variance = jnp.mean(jnp.square(centered), axis=(1, 2, 4), keepdims=True)
        normalized = (centered / jnp.sqrt(variance + self.eps)).reshape(x.shape)

        gamma = self.param("gamma", nn.initializers.ones, (channels,), jnp.float32)
        beta = self.param("beta", nn.initializers.zeros, (channels,), jnp.float32)
        return normalized * gamma + beta


class RootBlock(nn.Module):
    """7x7 stride-2 standardized convolution, then a 3x3 stride-2 max pool over a zero-padded input."""

    width: int

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = StandardizedConv2d(self.width, 7, strides=2, name="standardized_conv2d")(x)

        # Zero padding, as in the official code: the pooled values are conv outputs
        # before any ReLU, so they can be negative and the padding can win the max.
        before, after = _fixed_padding(3)
        x = jnp.pad(x, ((0, 0), (before, after), (before, after), (0, 0)))
        return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class Projection(nn.Module):
    """1x1 strided standardized convolution on the shortcut (`proj` in the checkpoint)."""

    features: int
    strides: int

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return StandardizedConv2d(self.features, 1, strides=self.strides, name="standardized_conv2d")(x)


class PreActivationConv(nn.Module):
    """GroupNorm, ReLU, then a standardized convolution: one of a unit's layers `a`, `b` and `c`.

    With `projection_features` set (layer `a` of a unit that changes shape), it also
    returns the projection of its pre-activated input for the shortcut, else None.
    """

    features: int
    kernel_size: int
    strides: int = 1
    projection_features: int | None = None
    projection_strides: int = 1

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray | None]:
        x = nn.relu(GroupNorm(name="group_norm")(x))

        shortcut = None
        if self.projection_features is not None:
            shortcut = Projection(self.projection_features, self.projection_strides, name="proj")(x)

        y = StandardizedConv2d(self.features, self.kernel_size, strides=self.strides, name="standardized_conv2d")(x)
        return y, shortcut


class BottleneckUnit(nn.Module):
    """Pre-activation bottleneck unit; `width` is the bottleneck width and the output has `4 * width` channels."""

    width: int
    strides: int = 1

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        out_features = 4 * self.width
        needs_projection = x.shape[-1] != out_features or self.strides != 1
        projection_features = out_features if needs_projection else None

        y, shortcut = PreActivationConv(
            self.width,
            1,
            projection_features=projection_features,
            projection_strides=self.strides,
            name="a",
        )(x)
        y, _ = PreActivationConv(self.width, 3, strides=self.strides, name="b")(y)
        y, _ = PreActivationConv(out_features, 1, name="c")(y)

        if shortcut is None:
            shortcut = x
        return y + shortcut


class Stage(nn.Module):
    """`num_units` bottleneck units; the first carries the stage's stride (`block1` to `block4`)."""

    num_units: int
    width: int
    first_strides: int

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = BottleneckUnit(self.width, strides=self.first_strides, name="unit01")(x)
        for index in range(2, self.num_units + 1):
            x = BottleneckUnit(self.width, name=f"unit{index:02d}")(x)
        return x


class BiTResNetV2(nn.Module):
    """BiT ResNet-v2 feature extractor.

    Maps `(batch, height, width, 3) float32` pixels scaled to [-1, 1] to
    `(batch, 2048 * width_factor) float32` features (GroupNorm, ReLU, global average
    pool). It has no batch statistics, so training and inference behave alike.
    """

    block_sizes: Sequence[int] = BLOCK_SIZES[50]
    width_factor: int = 1

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        base_width = 64 * self.width_factor
        x = RootBlock(base_width, name="root_block")(x)

        for index, num_units in enumerate(self.block_sizes):
            x = Stage(
                num_units,
                base_width * 2**index,
                first_strides=1 if index == 0 else 2,
                name=f"block{index + 1}",
            )(x)

        x = nn.relu(GroupNorm(name="group_norm")(x))
        return jnp.mean(x, axis=(1, 2))


def build_model(depth: int, width_factor: int = 1) -> BiTResNetV2:
    """Build the BiT ResNet-v2 of `depth` (50 or 101) and `width_factor`."""
    if depth not in BLOCK_SIZES:
        raise ValueError(f"BiT depth {depth} is not supported. Use one of {sorted(BLOCK_SIZES)}")
    return BiTResNetV2(block_sizes=BLOCK_SIZES[depth], width_factor=width_factor)


def load_params(path: str | Path, depth: int, width_factor: int = 1) -> Params:
    """Load an official BiT `.npz` file onto the variables of `build_model(depth, width_factor)`.

    Returns `{"params": ...}` for `module.apply`. The file's classifier head is
    ignored. Raises WeightsError naming the first missing, mis-shaped or unexpected
    tensor and the file.
    """
    model = build_model(depth, width_factor)
    sample = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    expected = jax.eval_shape(model.init, jax.random.key(0), sample)
    return load_bit_npz(path, expected["params"])


def _bit_backbone(dataset: str, depth: int, width_factor: int) -> Backbone:
    """Describe the BiT-`dataset`-R`depth`x`width_factor` backbone, `dataset` being "S" or "M"."""
    name = f"bit_{dataset.lower()}_r{depth}x{width_factor}"
    pretraining = _PRETRAINING[dataset]
    return Backbone(
        name=name,
        input_size=INPUT_SIZE,
        feature_size=2048 * width_factor,
        pixel_scaling=MINUS_ONE_TO_ONE,
        build=functools.partial(build_model, depth, width_factor),
        load_params=functools.partial(load_params, depth=depth, width_factor=width_factor),
        weights=name,
        description=(
            f"BiT-{dataset}-R{depth}x{width_factor}: ResNet-v2 with GroupNorm and weight standardization, "
            f"pre-trained on {pretraining}"
        ),
    )


def _bit_weights(dataset: str, depth: int, width_factor: int) -> WeightsEntry:
    """Describe the official `.npz` file of BiT-`dataset`-R`depth`x`width_factor`."""
    file_name = f"BiT-{dataset}-R{depth}x{width_factor}.npz"
    return WeightsEntry(
        name=f"bit_{dataset.lower()}_r{depth}x{width_factor}",
        backbone=f"bit_{dataset.lower()}_r{depth}x{width_factor}",
        file_name=file_name,
        url=f"https://storage.googleapis.com/bit_models/{file_name}",
        size=None,
        # Google publishes no checksum for these files, so crackjax records the
        # sha256 of the first download and checks it on every later use.
        hash_algorithm=None,
        file_hash=None,
        pixel_scaling=MINUS_ONE_TO_ONE,
        license="Apache-2.0",
        source="https://github.com/google-research/big_transfer",
        # The file contains the pre-training classifier (`resnet/head/conv2d/*`), which load_params ignores.
        include_top=True,
    )


_VARIANTS = (("M", 50, 1), ("S", 50, 1), ("M", 101, 1), ("S", 101, 1))

BACKBONES = tuple(_bit_backbone(*variant) for variant in _VARIANTS)
WEIGHTS = tuple(_bit_weights(*variant) for variant in _VARIANTS)
