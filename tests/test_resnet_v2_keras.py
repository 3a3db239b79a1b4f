"""ResNet-v2: the Keras `.h5` reader and the Flax model against Keras Applications on the JAX backend.

The reference models use random weights (`weights=None`) with random biases and
random batch norm statistics, written in the Keras 2 `.h5` layout that the
published ImageNet files use, so no download is needed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")

import h5py
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from sdnet_paths import SDNET_DIR
from crackjax.backbones.base import MINUS_ONE_TO_ONE, scale_pixels
from crackjax.backbones.resnet_v2 import BACKBONES, FEATURE_SIZE, WEIGHTS, ResNetV2, load_params
from crackjax.weights.entry import WeightsError
from crackjax.weights.keras_h5 import read_keras_h5

keras = pytest.importorskip("keras")
legacy_h5_format = pytest.importorskip("keras.src.legacy.saving.legacy_h5_format")

if keras.backend.backend() != "jax":
    pytest.skip(f"Keras runs on the {keras.backend.backend()} backend; set KERAS_BACKEND=jax", allow_module_level=True)

DATASET = SDNET_DIR
CRACKED_IMAGE = DATASET / "CD" / "7001-115.jpg"
UNCRACKED_IMAGE = DATASET / "UD" / "7001-1.jpg"

KERAS_MODELS = {
    50: keras.applications.ResNet50V2,
    101: keras.applications.ResNet101V2,
    152: keras.applications.ResNet152V2,
}
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def images() -> jnp.ndarray:
    """Two real SDNET2018 deck photos (cracked, uncracked) as `(2, 224, 224, 3) float32` in [-1, 1]."""
    if not CRACKED_IMAGE.is_file() or not UNCRACKED_IMAGE.is_file():
        pytest.skip(f"SDNET2018 images not found under {DATASET}")
    arrays = [np.asarray(Image.open(path).convert("RGB").resize((224, 224), Image.BILINEAR)) for path in (CRACKED_IMAGE, UNCRACKED_IMAGE)]
    return scale_pixels(jnp.asarray(np.stack(arrays)), MINUS_ONE_TO_ONE)


def _randomize(model, seed: int) -> None:
    """Give every conv bias and every batch norm (gamma, beta, moving mean, moving variance) random values."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, variance = layer.get_weights()
            layer.set_weights([
                rng.uniform(0.5, 1.5, gamma.shape).astype(np.float32),
                rng.normal(0.0, 0.1, beta.shape).astype(np.float32),
                rng.normal(0.0, 0.5, mean.shape).astype(np.float32),
                rng.uniform(0.5, 2.0, variance.shape).astype(np.float32),
            ])
        elif isinstance(layer, keras.layers.Conv2D) and layer.use_bias:
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel, rng.normal(0.0, 0.1, bias.shape).astype(np.float32)])


def _save_keras2_h5(model, path: Path) -> Path:
    """Write `model`'s weights in the Keras 2 `.h5` layout (root attribute `layer_names`)."""
    with h5py.File(path, "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, model)
    return path


@pytest.fixture(scope="module")
def keras_reference(tmp_path_factory, images):
    """Return `reference(depth) -> (h5 path, Keras features (2, 2048))`, building each depth once."""
    cache: dict[int, tuple[Path, np.ndarray]] = {}

    def reference(depth: int) -> tuple[Path, np.ndarray]:
        if depth not in cache:
            keras.utils.set_random_seed(depth)
            model = KERAS_MODELS[depth](weights=None, include_top=False, pooling="avg", input_shape=(224, 224, 3))
            _randomize(model, seed=depth)
            path = _save_keras2_h5(model, tmp_path_factory.mktemp(f"resnet{depth}v2") / f"resnet{depth}v2_notop.h5")
            features = np.asarray(model(np.asarray(images), training=False))
            cache[depth] = (path, features)
        return cache[depth]

    return reference


@pytest.mark.parametrize("depth", [50, 101, 152])
def test_resnet_v2_matches_keras(depth, images, keras_reference, record_property):
    path, expected = keras_reference(depth)

    with h5py.File(path, "r") as handle:
        assert "layer_names" in handle.attrs
    variables = load_params(depth, path)
    features = np.asarray(ResNetV2(depth=depth).apply(variables, images))

    max_difference = float(np.max(np.abs(features - expected)))
    record_property(f"resnet_v2_{depth}_max_abs_difference", max_difference)
    print(f"resnet_v2_{depth}: max abs difference {max_difference:.3g}, max abs feature {np.max(np.abs(expected)):.3g}")
    assert features.shape == (2, FEATURE_SIZE)
    assert np.std(expected) > 0.1  # the random batch norm statistics leave non-trivial features
    assert np.max(np.abs(expected[0] - expected[1])) > 10 * TOLERANCE  # the two photos give different features
    assert max_difference <= TOLERANCE


def test_full_file_loads_without_classifier(tmp_path, images):
    keras.utils.set_random_seed(7)
    model = keras.applications.ResNet50V2(weights=None, include_top=True)
    _randomize(model, seed=7)
    path = _save_keras2_h5(model, tmp_path / "resnet50v2_full.h5")
    pooled = keras.Model(model.inputs, model.get_layer("avg_pool").output)
    expected = np.asarray(pooled(np.asarray(images), training=False))

    assert "predictions" in read_keras_h5(path)
    variables = load_params(50, path)
    features = np.asarray(ResNetV2(depth=50).apply(variables, images))

    assert "predictions" not in variables["params"]
    assert np.max(np.abs(features - expected)) <= TOLERANCE


def _copy(path: Path, directory: Path) -> Path:
    copy = directory / path.name
    shutil.copyfile(path, copy)
    return copy


def test_load_params_missing_layer_names_it(tmp_path, keras_reference):
    path = _copy(keras_reference(50)[0], tmp_path)
    with h5py.File(path, "r+") as handle:
        del handle["conv3_block2_1_bn"]
        stored_names = [name.decode("utf8") if isinstance(name, bytes) else str(name) for name in handle.attrs["layer_names"]]
        layer_names = [name for name in stored_names if name != "conv3_block2_1_bn"]
        handle.attrs["layer_names"] = np.array([name.encode("utf8") for name in layer_names])

    with pytest.raises(WeightsError) as error:
        load_params(50, path)

    message = str(error.value)
    assert "layer conv3_block2_1_bn" in message
    assert "not found" in message
    assert str(path) in message


def test_load_params_misshaped_kernel_names_it(tmp_path, keras_reference):
    path = _copy(keras_reference(50)[0], tmp_path)
    with h5py.File(path, "r+") as handle:
        del handle["conv1_conv/conv1_conv/kernel"]
        handle["conv1_conv/conv1_conv/kernel"] = np.zeros((7, 7, 3, 32), np.float32)

    with pytest.raises(WeightsError) as error:
        load_params(50, path)

    message = str(error.value)
    assert "conv1_conv/kernel" in message
    assert "(7, 7, 3, 32)" in message
    assert "(7, 7, 3, 64)" in message
    assert str(path) in message


def test_load_params_wrong_depth_fails(keras_reference):
    path = keras_reference(50)[0]

    with pytest.raises(WeightsError) as error:
        load_params(101, path)

    assert "layer conv4_block7_preact_bn (" in str(error.value)


def test_load_params_keras3_file_rejected(tmp_path):
    model = keras.applications.ResNet50V2(weights=None, include_top=False)
    path = tmp_path / "resnet50v2.weights.h5"
    model.save_weights(path)

    with pytest.raises(WeightsError, match="no `layer_names` attribute"):
        load_params(50, path)


def test_registry_entries():
    backbones = {backbone.name: backbone for backbone in BACKBONES}
    entries = {entry.name: entry for entry in WEIGHTS}

    assert sorted(backbones) == ["resnet_v2_101", "resnet_v2_152", "resnet_v2_50"]
    assert len(entries) == 6
    for name, backbone in backbones.items():
        assert backbone.input_size == 224
        assert backbone.feature_size == 2048
        assert backbone.pixel_scaling == MINUS_ONE_TO_ONE
        assert backbone.weights == name
        assert not entries[name].include_top
        assert entries[name].file_name.endswith("_notop.h5")
        assert entries[f"{name}_full"].include_top
        assert entries[f"{name}_full"].url.endswith("_weights_tf_dim_ordering_tf_kernels.h5")
    assert entries["resnet_v2_50"].file_hash == "fac2f116257151a9d068a22e544a4917"
    assert entries["resnet_v2_50_full"].file_hash == "3ef43a0b657b3be2300d5770ece849e0"
    assert entries["resnet_v2_152"].url == (
        "https://storage.googleapis.com/tensorflow/keras-applications/resnet/resnet152v2_weights_tf_dim_ordering_tf_kernels_notop.h5"
    )
