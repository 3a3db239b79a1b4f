"""ONNX Runtime engine for the bottleneck: ONNX graphs built from crackjax's own Flax variables.

`build_onnx_model(backbone_name, variables)` writes the backbone as an ONNX graph
with `onnx.helper`, node by node, from the same variables that `module.apply`
uses, so no exporter is involved. The graph takes `(batch, size, size, 3) uint8`
images (dynamic batch), scales the pixels and transposes them to NCHW inside the
graph, and returns `(batch, features) float32` pooled features, as
`LoadedBackbone.forward` does.

Inference-mode batch norm is folded into the convolution before it where one
exists. The pre-activation batch norms of ResNet-v2 and the final `post_bn` follow
a residual sum, so they stay a per-channel affine `BatchNormalization`. BiT's weight
standardization is applied to the kernels here, and its GroupNorm becomes
`Reshape`, `InstanceNormalization`, `Reshape` and the per-channel affine.

Supported backbones: `resnet_v2_50/101/152`, `efficientnet_lite0/1/2` and the
`bit_*` ResNet-v2 backbones. `OnnxBackbone` runs the graph with ONNX Runtime's CPU
provider and has the `features()` method of `LoadedBackbone`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from collections.abc import Mapping

import numpy as np

from crackjax.backbones.base import IMAGENET_MEAN_STD, MINUS_ONE_TO_ONE, Backbone, Params

log = logging.getLogger(__name__)

# Bumped whenever the graphs that build_onnx_model writes change.
ENGINE_VERSION = 1
OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAME = "features"


class GraphBuilder:
    """Collector of ONNX nodes and initializers. Every method returns the name of the tensor it adds."""

    def __init__(self) -> None:
        self.nodes: list = []
        self.initializers: list = []
        self._count = 0

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def constant(self, value: np.ndarray, hint: str) -> str:
        from onnx import numpy_helper

        name = self._name(hint)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(self, op_type: str, inputs: list[str], hint: str, **attributes) -> str:
        from onnx import helper

        output = self._name(hint)
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output, **attributes))
        return output

    def conv(self, x: str, kernel_hwio: np.ndarray, bias: np.ndarray | None, *, stride: int = 1, pads: tuple[int, int, int, int] = (0, 0, 0, 0), group: int = 1, hint: str = "conv") -> str:
        """Add a 2-D convolution with a Flax `(kh, kw, in / group, out)` kernel and `pads` in ONNX order (top, left, bottom, right)."""
        kernel = np.transpose(np.asarray(kernel_hwio, np.float32), (3, 2, 0, 1))
        inputs = [x, self.constant(kernel, f"{hint}_w")]
        if bias is not None:
            inputs.append(self.constant(np.asarray(bias, np.float32), f"{hint}_b"))
        return self.node(
            "Conv",
            inputs,
            hint,
            kernel_shape=list(kernel.shape[2:]),
            strides=[stride, stride],
            pads=list(pads),
            group=group,
        )

    def channel_affine(self, x: str, scale: np.ndarray, shift: np.ndarray, hint: str) -> str:
        """Add `x * scale + shift` with one scale and shift per channel of an NCHW tensor.

        It is written as a `BatchNormalization` node with mean 0, variance 1 and epsilon
        0, which ONNX Runtime 1.31 runs as one kernel. ResNet50-v2 ran 7% faster this way than
        with a `Mul` and an `Add` (27.7 against 25.9 img/s, batch 32, 2 CPU cores).
        """
        scale = np.asarray(scale, np.float32).reshape(-1)
        shift = np.asarray(shift, np.float32).reshape(-1)
        inputs = [
            x,
            self.constant(scale, f"{hint}_scale"),
            self.constant(shift, f"{hint}_shift"),
            self.constant(np.zeros_like(scale), f"{hint}_mean"),
            self.constant(np.ones_like(scale), f"{hint}_var"),
        ]
        return self.node("BatchNormalization", inputs, f"{hint}_affine", epsilon=0.0)

    def relu(self, x: str) -> str:
        return self.node("Relu", [x], "relu")

    def relu6(self, x: str) -> str:
        low = self.constant(np.array(0.0, np.float32), "zero")
        high = self.constant(np.array(6.0, np.float32), "six")
        return self.node("Clip", [x, low, high], "relu6")

    def add(self, a: str, b: str) -> str:
        return self.node("Add", [a, b], "residual")

    def zero_padded_max_pool(self, x: str, size: int) -> str:
        """Add a 3x3 stride-2 max pool over an NCHW tensor of `size` x `size` pixels padded by 1 with zeros, and return it with its output size.

        ONNX `MaxPool` pads ignore the padded cells, so the zeros come back as a
        per-pixel floor: 0 where the window covers padding, -inf elsewhere. An explicit
        `Pad` before `MaxPool` would be fused into the pool's own padding by ONNX
        Runtime's `Pad_Fusion` (1.31), which changes the result where the pooled values
        are negative.
        """
        pooled = self.node("MaxPool", [x], "max_pool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
        output_size = (size - 1) // 2 + 1
        starts = 2 * np.arange(output_size)  # first padded row or column of each window
        touches = (starts == 0) | (starts + 2 >= size + 1)
        floor = np.where(touches[:, None] | touches[None, :], 0.0, -np.inf).astype(np.float32)
        return self.node("Max", [pooled, self.constant(floor.reshape(1, 1, output_size, output_size), "pad_floor")], "zero_pad_max"), output_size

    def subsample(self, x: str, stride: int) -> str:
        """Keep every `stride`-th row and column of an NCHW tensor, as `x[:, :, ::stride, ::stride]`."""
        starts = self.constant(np.array([0, 0], np.int64), "starts")
        ends = self.constant(np.array([np.iinfo(np.int64).max] * 2, np.int64), "ends")
        axes = self.constant(np.array([2, 3], np.int64), "axes")
        steps = self.constant(np.array([stride, stride], np.int64), "steps")
        return self.node("Slice", [x, starts, ends, axes, steps], "subsample")

    def global_average_pool(self, x: str) -> str:
        pooled = self.node("GlobalAveragePool", [x], "pool")
        return self.node("Flatten", [pooled], "flatten", axis=1)

    def model(self, size: int, output: str, feature_size: int, graph_name: str):
        """Wrap the nodes in a model with a `(batch, size, size, 3) uint8` input and a `(batch, feature_size) float32` output."""
        from onnx import TensorProto, helper

        self.nodes.append(helper.make_node("Identity", [output], [OUTPUT_NAME], name=OUTPUT_NAME))
        graph = helper.make_graph(
            self.nodes,
            graph_name,
            [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["batch", size, size, 3])],
            [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", feature_size])],
            self.initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="crackjax", producer_version=str(ENGINE_VERSION))
        model.ir_version = 8
        return model


def _array(value) -> np.ndarray:
    return np.asarray(value, np.float64)


def _fold_batch_norm(kernel_hwio, bias, bn_params: Mapping, bn_stats: Mapping, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """Return the kernel and bias of a convolution followed by inference-mode batch norm, as one convolution."""
    scale = _array(bn_params["scale"]) / np.sqrt(_array(bn_stats["var"]) + epsilon)
    kernel = _array(kernel_hwio) * scale
    bias = np.zeros_like(scale) if bias is None else _array(bias)
    shift = (bias - _array(bn_stats["mean"])) * scale + _array(bn_params["bias"])
    return kernel.astype(np.float32), shift.astype(np.float32)


def _batch_norm_affine(bn_params: Mapping, bn_stats: Mapping, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """Return the per-channel `(scale, shift)` of inference-mode batch norm."""
    scale = _array(bn_params["scale"]) / np.sqrt(_array(bn_stats["var"]) + epsilon)
    shift = _array(bn_params["bias"]) - _array(bn_stats["mean"]) * scale
    return scale.astype(np.float32), shift.astype(np.float32)


def _scaled_input(graph: GraphBuilder, pixel_scaling: str) -> str:
    """Add the NHWC uint8 -> NCHW float32 transpose and the backbone's pixel scaling (see `scale_pixels`)."""
    x = graph.node("Transpose", [INPUT_NAME], "nchw", perm=[0, 3, 1, 2])
    x = graph.node("Cast", [x], "float", to=1)
    if pixel_scaling == MINUS_ONE_TO_ONE:
        x = graph.node("Div", [x, graph.constant(np.array(127.5, np.float32), "divisor")], "scale")
        return graph.node("Sub", [x, graph.constant(np.array(1.0, np.float32), "one")], "shift")
    if pixel_scaling == IMAGENET_MEAN_STD:
        from crackjax.backbones.base import _IMAGENET_MEAN, _IMAGENET_STD

        x = graph.node("Div", [x, graph.constant(np.array(255.0, np.float32), "divisor")], "scale")
        x = graph.node("Sub", [x, graph.constant(_IMAGENET_MEAN.reshape(1, 3, 1, 1), "mean")], "center")
        return graph.node("Div", [x, graph.constant(_IMAGENET_STD.reshape(1, 3, 1, 1), "std")], "normalize")
    raise ValueError(f"unknown pixel scaling {pixel_scaling!r}; expected {MINUS_ONE_TO_ONE!r} or {IMAGENET_MEAN_STD!r}")


def _resnet_v2_graph(graph: GraphBuilder, x: str, variables: Params, depth: int, size: int) -> str:
    """Add ResNet-v2 in the Keras Applications layout (see `crackjax.backbones.resnet_v2`)."""
    from crackjax.backbones.resnet_v2 import BN_EPSILON, STACK_STRIDES, STACK_UNITS, STACK_WIDTHS

    params, stats = variables["params"], variables["batch_stats"]

    def folded_conv(x: str, name: str, bn: str, stride: int, padding: int) -> str:
        kernel, bias = _fold_batch_norm(params[name]["kernel"], params[name].get("bias"), params[bn], stats[bn], BN_EPSILON)
        return graph.conv(x, kernel, bias, stride=stride, pads=(padding,) * 4, hint=name)

    def plain_conv(x: str, name: str, stride: int = 1, padding: int = 0) -> str:
        return graph.conv(x, params[name]["kernel"], params[name].get("bias"), stride=stride, pads=(padding,) * 4, hint=name)

    def pre_activation(x: str, bn: str) -> str:
        scale, shift = _batch_norm_affine(params[bn], stats[bn], BN_EPSILON)
        return graph.relu(graph.channel_affine(x, scale, shift, bn))

    x = plain_conv(x, "conv1_conv", stride=2, padding=3)
    x, _ = graph.zero_padded_max_pool(x, -(-size // 2))

    stacks = zip(STACK_UNITS[depth], STACK_WIDTHS, STACK_STRIDES)
    for stack_index, (units, _width, stack_stride) in enumerate(stacks, start=2):
        for unit in range(1, units + 1):
            name = f"conv{stack_index}_block{unit}"
            stride = stack_stride if unit == units else 1
            preact = pre_activation(x, f"{name}_preact_bn")

            if unit == 1:
                shortcut = plain_conv(preact, f"{name}_0_conv", stride=stride)
            elif stride > 1:
                shortcut = graph.subsample(x, stride)
            else:
                shortcut = x

            y = graph.relu(folded_conv(preact, f"{name}_1_conv", f"{name}_1_bn", 1, 0))
            y = graph.relu(folded_conv(y, f"{name}_2_conv", f"{name}_2_bn", stride, 1))
            y = plain_conv(y, f"{name}_3_conv")
            x = graph.add(shortcut, y)

    return graph.global_average_pool(pre_activation(x, "post_bn"))


def _efficientnet_lite_graph(graph: GraphBuilder, x: str, variables: Params, width: float, depth: float, size: int) -> str:
    """Add EfficientNet-Lite with TensorFlow "SAME" padding (see `crackjax.backbones.efficientnet_lite`)."""
    from crackjax.backbones.efficientnet_lite import BATCH_NORM_EPSILON, _same_padding, block_configs

    params, stats = variables["params"], variables["batch_stats"]

    def conv_bn(x: str, conv: Mapping, bn_params: Mapping, bn_stats: Mapping, *, stride: int, size: int, group: int = 1, hint: str) -> tuple[str, int]:
        kernel, bias = _fold_batch_norm(conv["kernel"], None, bn_params, bn_stats, BATCH_NORM_EPSILON)
        before, after = _same_padding(size, kernel.shape[0], stride)
        output = graph.conv(x, kernel, bias, stride=stride, pads=(before, before, after, after), group=group, hint=hint)
        return output, -(-size // stride)

    x, size = conv_bn(x, params["conv_stem"], params["bn0"], stats["bn0"], stride=2, size=size, hint="conv_stem")
    x = graph.relu6(x)

    for index, config in enumerate(block_configs(width, depth)):
        name = f"blocks_{index}"
        block_params, block_stats = params[name], stats[name]
        inputs = x
        if config.expand_ratio != 1:
            x, _ = conv_bn(x, block_params["expand_conv"], block_params["bn0"], block_stats["bn0"], stride=1, size=size, hint=f"{name}_expand")
            x = graph.relu6(x)

        channels = config.input_features * config.expand_ratio
        x, size = conv_bn(x, block_params["depthwise_conv"], block_params["bn1"], block_stats["bn1"], stride=config.stride, size=size, group=channels, hint=f"{name}_depthwise")
        x = graph.relu6(x)

        x, _ = conv_bn(x, block_params["project_conv"], block_params["bn2"], block_stats["bn2"], stride=1, size=size, hint=f"{name}_project")
        if config.stride == 1 and config.input_features == config.output_features:
            x = graph.add(x, inputs)

    x, _ = conv_bn(x, params["conv_head"], params["bn1"], stats["bn1"], stride=1, size=size, hint="conv_head")
    return graph.global_average_pool(graph.relu6(x))


def _standardized_kernel(kernel) -> np.ndarray:
    """Apply BiT weight standardization to a `(kh, kw, in, out)` kernel (see `StandardizedConv2d`)."""
    from crackjax.backbones.bit import WEIGHT_STANDARDIZATION_EPS

    kernel = _array(kernel)
    centered = kernel - kernel.mean(axis=(0, 1, 2), keepdims=True)
    variance = np.mean(np.square(centered), axis=(0, 1, 2), keepdims=True)
    return (centered / np.sqrt(variance + WEIGHT_STANDARDIZATION_EPS)).astype(np.float32)


def _bit_graph(graph: GraphBuilder, x: str, variables: Params, block_sizes, width_factor: int, size: int) -> str:
    """Add BiT ResNet-v2 with GroupNorm and standardized kernels (see `crackjax.backbones.bit`)."""
    from crackjax.backbones.bit import GROUP_NORM_EPS, GROUP_NORM_GROUPS

    params = variables["params"]

    def conv(x: str, layer: Mapping, stride: int, hint: str) -> str:
        kernel = _standardized_kernel(layer["standardized_conv2d"]["kernel"])
        before = (kernel.shape[0] - 1) // 2
        after = kernel.shape[0] - 1 - before
        return graph.conv(x, kernel, None, stride=stride, pads=(before, before, after, after), hint=hint)

    def group_norm_relu(x: str, norm: Mapping, channels: int, size: int, hint: str) -> str:
        # InstanceNormalization over (batch, groups, rest) normalizes each group over its channels and pixels.
        grouped = graph.node("Reshape", [x, graph.constant(np.array([0, GROUP_NORM_GROUPS, -1], np.int64), "group_shape")], f"{hint}_group")
        ones = graph.constant(np.ones(GROUP_NORM_GROUPS, np.float32), "ones")
        zeros = graph.constant(np.zeros(GROUP_NORM_GROUPS, np.float32), "zeros")
        normalized = graph.node("InstanceNormalization", [grouped, ones, zeros], f"{hint}_norm", epsilon=GROUP_NORM_EPS)
        shape = graph.constant(np.array([0, channels, size, size], np.int64), "shape")
        x = graph.node("Reshape", [normalized, shape], f"{hint}_ungroup")
        return graph.relu(graph.channel_affine(x, norm["gamma"], norm["beta"], hint))

    base_width = 64 * width_factor
    x = conv(x, params["root_block"], 2, "root")
    x, size = graph.zero_padded_max_pool(x, -(-size // 2))
    channels = base_width

    for stage_index, num_units in enumerate(block_sizes):
        stage = params[f"block{stage_index + 1}"]
        width = base_width * 2**stage_index
        for unit_index in range(1, num_units + 1):
            unit = stage[f"unit{unit_index:02d}"]
            stride = 2 if stage_index > 0 and unit_index == 1 else 1
            hint = f"block{stage_index + 1}_unit{unit_index:02d}"

            preact = group_norm_relu(x, unit["a"]["group_norm"], channels, size, f"{hint}_a")
            shortcut = conv(preact, unit["a"]["proj"], stride, f"{hint}_proj") if "proj" in unit["a"] else x
            y = conv(preact, unit["a"], 1, f"{hint}_a")
            y = conv(group_norm_relu(y, unit["b"]["group_norm"], width, size, f"{hint}_b"), unit["b"], stride, f"{hint}_b")
            size = -(-size // stride)
            y = conv(group_norm_relu(y, unit["c"]["group_norm"], width, size, f"{hint}_c"), unit["c"], 1, f"{hint}_c")
            x = graph.add(y, shortcut)
            channels = 4 * width

    return graph.global_average_pool(group_norm_relu(x, params["group_norm"], channels, size, "final"))


def build_onnx_model(backbone_name: str, variables: Params):
    """Build the ONNX model of backbone `backbone_name` with the Flax `variables` of its module.

    Input `images`: `(batch, size, size, 3) uint8`; output `features`: `(batch,
    feature_size) float32`. Raises ValueError for a backbone this engine does not
    support, and KeyError naming a layer that `variables` lacks.
    """
    from crackjax.backbones import get_backbone

    backbone = get_backbone(backbone_name)
    graph = GraphBuilder()
    x = _scaled_input(graph, backbone.pixel_scaling)
    size = backbone.input_size

    if backbone_name.startswith("resnet_v2_"):
        output = _resnet_v2_graph(graph, x, variables, int(backbone_name.rsplit("_", 1)[1]), size)
    elif backbone_name.startswith("efficientnet_lite"):
        from crackjax.backbones.efficientnet_lite import _VARIANTS

        width, depth, _ = _VARIANTS[backbone_name]
        output = _efficientnet_lite_graph(graph, x, variables, width, depth, size)
    elif backbone_name.startswith("bit_"):
        module = backbone.build()
        output = _bit_graph(graph, x, variables, module.block_sizes, module.width_factor, size)
    else:
        raise ValueError(f"the onnxruntime engine does not support backbone {backbone_name!r}; use engine 'xla'")

    return graph.model(size, output, backbone.feature_size, backbone_name)


def session_options(threads: int | None = None):
    """Return ONNX Runtime session options: `threads` intra-op threads, all graph optimizations.

    `threads` defaults to `$CRACKJAX_ORT_THREADS`, else the CPUs this process may use.
    Several engine processes on one machine (local Dask workers) share the CPUs by
    setting that variable.
    """
    import onnxruntime

    if threads is None:
        threads = ort_threads()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def ort_threads() -> int:
    """Return the intra-op thread count: `$CRACKJAX_ORT_THREADS` when it is a positive whole number, else the usable CPUs."""
    value = os.environ.get("CRACKJAX_ORT_THREADS", "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    if value:
        log.warning("backbone: CRACKJAX_ORT_THREADS=%r is not a positive whole number; using every CPU", value)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclasses.dataclass(frozen=True)
class OnnxBackbone:
    """A backbone with its weights loaded, run by ONNX Runtime: `features` maps `(batch, size, size, 3) uint8` to `(batch, features) float32`.

    It has the fields of `LoadedBackbone`, so the bottleneck stage and `Predictor`
    use either; `engine` is "onnxruntime" and `compute_dtype` is always float32.
    """

    backbone: Backbone
    variables: Params
    weights_name: str
    weights_path: str
    weights_sha256: str
    compute_dtype: str = "float32"
    engine: str = "onnxruntime"

    @functools.cached_property
    def session(self):
        import onnxruntime

        started = time.perf_counter()
        model = build_onnx_model(self.backbone.name, self.variables)
        built = time.perf_counter()
        options = session_options()
        session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        log.info(
            "backbone: built the ONNX graph of %s in %.1f s and the ONNX Runtime session (intra-op threads: %d) in %.1f s",
            self.backbone.name,
            built - started,
            options.intra_op_num_threads,
            time.perf_counter() - built,
        )
        return session

    def features(self, images: np.ndarray) -> np.ndarray:
        """Return the `(batch, features) float32` features of `(batch, size, size, 3) uint8` images (any batch size)."""
        images = np.ascontiguousarray(images, np.uint8)
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]
