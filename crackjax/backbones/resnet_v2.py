"""ResNet-v2 50/101/152 (pre-activation bottleneck units) in the Keras Applications layout.

The network matches `keras.applications.ResNet50V2`, `ResNet101V2` and
`ResNet152V2` (Keras 3.15, `keras/src/applications/resnet.py` and
`resnet_v2.py`) layer for layer, so the Keras ImageNet weights load by layer
name and give the same features:

* stem: zero padding 3, 7x7/2 convolution with bias and no batch norm, zero
  padding 1, 3x3/2 max pooling. The pooling pads with zeros, not -inf, and
  matters because the convolution output it pools can be negative.
* four stacks (`conv2` .. `conv5`) of bottleneck units. A unit is batch norm +
  ReLU (`preact`), 1x1 conv, BN, ReLU, zero padding 1, 3x3 conv, BN, ReLU,
  1x1 conv with bias, plus the shortcut. The first unit of a stack projects the
  pre-activated input with a 1x1 conv (`_0_conv`). The last unit carries the
  stack's stride, in its 3x3 conv, and subsamples the raw input for its
  shortcut (Keras: 1x1 max pooling with that stride).
  `conv2`..`conv4` have stride 2 and `conv5` stride 1.
* `post_bn` + ReLU, then global average pooling to 2048 features.

Every batch norm uses epsilon 1.001e-5, as Keras sets it.
"""

from __future__ import annotations

import functools
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp

from crackjax.backbones.base import MINUS_ONE_TO_ONE, Backbone, Params
from crackjax.weights.entry import WeightsEntry
from crackjax.weights.keras_h5 import keras_h5_to_variables

# Depth -> number of bottleneck units in the stacks conv2, conv3, conv4, conv5.
STACK_UNITS = {
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
STACK_WIDTHS = (64, 128, 256, 512)  # bottleneck width, and a unit outputs 4x this many channels
STACK_STRIDES = (2, 2, 2, 1)  # stride of the last unit of each stack
BN_EPSILON = 1.001e-5
FEATURE_SIZE = 2048
INPUT_SIZE = 224


class ResNetV2(nn.Module):
    """ResNet-v2 feature extractor with Keras Applications layer names.

    Maps `(batch, height, width, 3) float32` pixels scaled to [-1, 1] to
    `(batch, 2048) float32` average-pooled features, with batch norm in
    inference mode (it uses the `batch_stats` collection and never updates it).
    Submodules carry the Keras layer names (`conv1_conv`,
    `conv2_block1_preact_bn`, ..., `post_bn`), so the variables tree is flat:
    `params[layer]` and `batch_stats[layer]`.
    """

    depth: int

    def _batch_norm(self, x: jnp.ndarray, name: str) -> jnp.ndarray:
        return nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name=name)(x)

    def _unit(self, x: jnp.ndarray, width: int, stride: int, project: bool, name: str) -> jnp.ndarray:
        """Apply one pre-activation bottleneck unit (Keras `residual_block_v2`)."""
        preact = nn.relu(self._batch_norm(x, f"{name}_preact_bn"))

        if project:
            shortcut = nn.Conv(4 * width, (1, 1), strides=stride, padding="VALID", name=f"{name}_0_conv")(preact)
        else:
            # Keras subsamples with MaxPooling2D(1, strides=stride), which picks every stride-th pixel.
            shortcut = x[:, ::stride, ::stride, :]

        y = nn.Conv(width, (1, 1), padding="VALID", use_bias=False, name=f"{name}_1_conv")(preact)
        y = nn.relu(self._batch_norm(y, f"{name}_1_bn"))
        y = nn.Conv(width, (3, 3), strides=stride, padding=((1, 1), (1, 1)), use_bias=False, name=f"{name}_2_conv")(y)
        y = nn.relu(self._batch_norm(y, f"{name}_2_bn"))
        y = nn.Conv(4 * width, (1, 1), padding="VALID", name=f"{name}_3_conv")(y)
        return shortcut + y

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.depth not in STACK_UNITS:
            raise ValueError(f"ResNet-v2 depth {self.depth} is not supported; expected one of {sorted(STACK_UNITS)}")

        x = nn.Conv(64, (7, 7), strides=2, padding=((3, 3), (3, 3)), name="conv1_conv")(x)
        x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")

        stacks = zip(STACK_UNITS[self.depth], STACK_WIDTHS, STACK_STRIDES)
        for stack_index, (units, width, stride) in enumerate(stacks, start=2):
            for unit in range(1, units + 1):
                x = self._unit(
                    x,
                    width,
                    stride=stride if unit == units else 1,
                    project=unit == 1,
                    name=f"conv{stack_index}_block{unit}",
                )

        x = nn.relu(self._batch_norm(x, "post_bn"))
        return jnp.mean(x, axis=(1, 2))


def expected_variables(depth: int) -> dict[str, dict[str, dict[str, jax.ShapeDtypeStruct]]]:
    """Return the shapes of the model's variables, layers in the order the model creates them, without computing them.

    `jax.eval_shape` returns dicts with sorted keys, so the creation order is
    recorded while `init` is traced and the layers are put back in that order.
    WeightsError messages then name the first missing layer in network order.
    """
    module = ResNetV2(depth=depth)
    sample = jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    layer_order: list[str] = []

    def init(rng: jax.Array, x: jnp.ndarray):
        variables = module.init(rng, x)
        layer_order.extend(variables["params"])
        return variables

    shapes = jax.eval_shape(init, jax.random.PRNGKey(0), sample)
    return {
        collection: {layer: shapes[collection][layer] for layer in layer_order if layer in shapes[collection]}
        for collection in ("params", "batch_stats")
    }


def load_params(depth: int, path: str | Path) -> Params:
    """Load a Keras Applications ResNet-v2 `.h5` file (notop or full) into variables for `ResNetV2(depth).apply`.

    Raises WeightsError naming the file and the first missing or mis-shaped tensor.
    """
    return keras_h5_to_variables(path, expected_variables(depth))


# Keras Applications ImageNet weights. The md5 pairs (full, notop) are WEIGHTS_HASHES
# in keras/src/applications/resnet.py (Keras 3.15.1), equal to those in
# keras-applications `keras_applications/resnet_common.py`. The notop sizes are the byte
# counts that Keras's own download progress prints, as quoted in public logs.
# NOTE: no published size was found for the full files, so their size is None.
_BASE_URL = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
_LICENSE = (
    "No license is stated for the weights files. Keras (Apache-2.0) and keras-applications (MIT) "
    "license their code, and the weights were trained on ImageNet-1k."
)
_KERAS_FILES = {
    # depth: (keras weights name, md5 full, md5 notop, notop size in bytes)
    50: ("resnet50v2", "3ef43a0b657b3be2300d5770ece849e0", "fac2f116257151a9d068a22e544a4917", 94668760),
    101: ("resnet101v2", "6343647c601c52e1368623803854d971", "c0ed64b8031c3730f411d2eb4eea35b5", 171317808),
    152: ("resnet152v2", "a49b44d1979771252814e80f8ec446f9", "ed17cf2e0169df9d443503ef94b23b33", 234545216),
}


def _weights_entries(depth: int) -> tuple[WeightsEntry, WeightsEntry]:
    keras_name, md5_full, md5_notop, notop_size = _KERAS_FILES[depth]
    backbone = f"resnet_v2_{depth}"
    notop_file = f"{keras_name}_weights_tf_dim_ordering_tf_kernels_notop.h5"
    full_file = f"{keras_name}_weights_tf_dim_ordering_tf_kernels.h5"
    common = dict(backbone=backbone, hash_algorithm="md5", pixel_scaling=MINUS_ONE_TO_ONE, license=_LICENSE, source="Keras Applications")
    notop = WeightsEntry(name=backbone, file_name=notop_file, url=_BASE_URL + notop_file, size=notop_size, file_hash=md5_notop, **common)
    full = WeightsEntry(
        name=f"{backbone}_full",
        file_name=full_file,
        url=_BASE_URL + full_file,
        size=None,
        file_hash=md5_full,
        include_top=True,
        **common,
    )
    return notop, full


def _backbone(depth: int) -> Backbone:
    return Backbone(
        name=f"resnet_v2_{depth}",
        input_size=INPUT_SIZE,
        feature_size=FEATURE_SIZE,
        pixel_scaling=MINUS_ONE_TO_ONE,
        build=functools.partial(ResNetV2, depth=depth),
        load_params=functools.partial(load_params, depth),
        weights=f"resnet_v2_{depth}",
        description=f"ResNet{depth}V2 from Keras Applications, ImageNet-1k, 2048 average-pooled features",
    )


BACKBONES = tuple(_backbone(depth) for depth in STACK_UNITS)
WEIGHTS = tuple(entry for depth in STACK_UNITS for entry in _weights_entries(depth))
