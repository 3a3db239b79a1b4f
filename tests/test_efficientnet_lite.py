"""EfficientNet-Lite: the torch-free checkpoint reader and the Flax model against a PyTorch reference."""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from sdnet_paths import SDNET_DIR
from crackjax.backbones.base import scale_pixels
from crackjax.backbones.efficientnet_lite import (
    BACKBONES,
    BATCH_NORM_EPSILON,
    WEIGHTS,
    block_configs,
    classifier_from_state_dict,
    convert_state_dict,
    package_weights_path,
)
from crackjax.weights.entry import WeightsError
from crackjax.weights.torch_pth import read_state_dict

torch = pytest.importorskip("torch")
F = torch.nn.functional

DATASET = SDNET_DIR
CRACKED_IMAGE = DATASET / "CD" / "7001-115.jpg"
UNCRACKED_IMAGE = DATASET / "UD" / "7001-1.jpg"

BACKBONE = {backbone.name: backbone for backbone in BACKBONES}["efficientnet_lite0"]
ENTRY = {entry.name: entry for entry in WEIGHTS}["efficientnet_lite0"]


@pytest.fixture(scope="module")
def weights_path() -> Path:
    path = package_weights_path(ENTRY)
    if path is None:
        pytest.skip(f"package {ENTRY.package} is not installed")
    return path


@pytest.fixture(scope="module")
def torch_state_dict(weights_path):
    return torch.load(weights_path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Two real SDNET2018 deck photos (cracked, uncracked), resized to `(2, 224, 224, 3) uint8`."""
    if not CRACKED_IMAGE.is_file() or not UNCRACKED_IMAGE.is_file():
        pytest.skip(f"SDNET2018 images not found under {DATASET}")
    size = (BACKBONE.input_size, BACKBONE.input_size)
    arrays = [np.asarray(Image.open(path).convert("RGB").resize(size, Image.BILINEAR)) for path in (CRACKED_IMAGE, UNCRACKED_IMAGE)]
    return np.stack(arrays)


@pytest.fixture(scope="module")
def flax_features(weights_path, images) -> np.ndarray:
    variables = BACKBONE.load_params(weights_path)
    pixels = scale_pixels(jnp.asarray(images), BACKBONE.pixel_scaling)
    return np.asarray(jax.jit(BACKBONE.build().apply)(variables, pixels))


# -- A PyTorch reference written from the ML Illustrated fork of lukemelas/EfficientNet-PyTorch --------


def _same_padding(x, kernel_size: int, stride: int):
    """Pad `(N, C, H, W)` like TensorFlow "SAME": total max((ceil(i/s)-1)*s + k - i, 0), the extra pixel after."""
    pads = []
    for size in (x.shape[3], x.shape[2]):
        total = max((math.ceil(size / stride) - 1) * stride + kernel_size - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class _SameConv(torch.nn.Conv2d):
    def forward(self, x):
        x = _same_padding(x, self.kernel_size[0], self.stride[0])
        return F.conv2d(x, self.weight, None, self.stride, 0, 1, self.groups)


class _TorchBlock(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        hidden = config.input_features * config.expand_ratio
        if config.expand_ratio != 1:
            self._expand_conv = _SameConv(config.input_features, hidden, 1, bias=False)
            self._bn0 = torch.nn.BatchNorm2d(hidden, eps=BATCH_NORM_EPSILON)
        self._depthwise_conv = _SameConv(hidden, hidden, config.kernel_size, stride=config.stride, groups=hidden, bias=False)
        self._bn1 = torch.nn.BatchNorm2d(hidden, eps=BATCH_NORM_EPSILON)
        self._project_conv = _SameConv(hidden, config.output_features, 1, bias=False)
        self._bn2 = torch.nn.BatchNorm2d(config.output_features, eps=BATCH_NORM_EPSILON)

    def forward(self, inputs):
        x = inputs
        if self.config.expand_ratio != 1:
            x = F.relu6(self._bn0(self._expand_conv(x)))
        x = F.relu6(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        if self.config.stride == 1 and self.config.input_features == self.config.output_features:
            x = x + inputs
        return x


class _TorchEfficientNetLite(torch.nn.Module):
    def __init__(self, width: float, depth: float):
        super().__init__()
        configs = block_configs(width, depth)
        self._conv_stem = _SameConv(3, 32, 3, stride=2, bias=False)
        self._bn0 = torch.nn.BatchNorm2d(32, eps=BATCH_NORM_EPSILON)
        self._blocks = torch.nn.ModuleList([_TorchBlock(config) for config in configs])
        self._conv_head = _SameConv(configs[-1].output_features, 1280, 1, bias=False)
        self._bn1 = torch.nn.BatchNorm2d(1280, eps=BATCH_NORM_EPSILON)
        self._fc = torch.nn.Linear(1280, 1000)

    def features(self, x):
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))


# -- The checkpoint reader ---------------------------------------------------------------------------


def test_reader_matches_torch_load(weights_path, torch_state_dict):
    arrays = read_state_dict(weights_path)

    assert list(arrays) == list(torch_state_dict)
    for name, tensor in torch_state_dict.items():
        expected = tensor.numpy()
        assert arrays[name].dtype == expected.dtype, name
        assert arrays[name].shape == expected.shape, name
        assert np.array_equal(arrays[name], expected), name


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_reader_strided_views_and_dtypes(tmp_path, zip_format):
    base = torch.arange(60, dtype=torch.float32).reshape(5, 12)
    saved = {
        "offset_view": base[2:, 1:],
        "strided_view": base[:, ::3],
        "transposed": base.t(),
        "half": torch.linspace(-2, 2, 7, dtype=torch.float16),
        "long": torch.tensor([[-(2**40), 3]], dtype=torch.int64),
        "scalar": torch.tensor(7, dtype=torch.int64),
        "parameter": torch.nn.Parameter(torch.ones(2, 3)),
    }
    path = tmp_path / "views.pth"
    torch.save(saved, path, _use_new_zipfile_serialization=zip_format)

    arrays = read_state_dict(path)

    assert list(arrays) == list(saved)
    for name, tensor in saved.items():
        expected = tensor.detach().numpy()
        assert arrays[name].dtype == expected.dtype, name
        assert np.array_equal(arrays[name], expected), name


class _NotATensor:
    pass


def test_reader_rejects_foreign_globals(tmp_path):
    path = tmp_path / "foreign.pth"
    torch.save({"weight": torch.zeros(2), "extra": _NotATensor()}, path)

    with pytest.raises(WeightsError, match="_NotATensor"):
        read_state_dict(path)


def test_loader_runs_without_torch(weights_path):
    script = (
        "import sys; from crackjax.backbones.efficientnet_lite import BACKBONES; "
        f"BACKBONES[0].load_params({str(weights_path)!r}); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    root = Path(__file__).resolve().parents[1]
    environment = {**os.environ, "PYTHONPATH": str(root)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment, timeout=120)

    assert result.returncode == 0, result.stderr


def test_reader_rejects_non_checkpoint(tmp_path):
    path = tmp_path / "noise.pth"
    path.write_bytes(b"this is not a checkpoint" * 10)

    with pytest.raises(WeightsError, match="noise.pth"):
        read_state_dict(path)


# -- The Flax model -----------------------------------------------------------------------------------


def test_features_match_torch_reference(torch_state_dict, images, flax_features):
    reference = _TorchEfficientNetLite(width=1.0, depth=1.0).eval()
    reference.load_state_dict(torch_state_dict, strict=True)

    pixels = np.array(scale_pixels(jnp.asarray(images), BACKBONE.pixel_scaling))
    with torch.no_grad():
        expected = reference.features(torch.from_numpy(pixels).permute(0, 3, 1, 2)).numpy()

    assert flax_features.shape == (2, BACKBONE.feature_size)
    assert flax_features.dtype == np.float32
    max_difference = float(np.max(np.abs(flax_features - expected)))
    print(f"efficientnet_lite0 max |flax - torch| over 2 images x 1280 features: {max_difference:.3g}")
    assert max_difference <= 1e-4


def test_classifier_is_not_uniform(weights_path, flax_features):
    kernel, bias = classifier_from_state_dict(read_state_dict(weights_path))
    logits = flax_features @ kernel + bias
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    entropy = -(probabilities * np.log(probabilities)).sum(axis=1)

    # Deck photos are not ImageNet classes: the top-1 probability measured on these two is 0.05 and 0.03,
    # against 0.001 for a uniform distribution, whose entropy is log(1000) = 6.91 (measured 6.2).
    assert np.all(probabilities.max(axis=1) > 0.01)
    assert np.all(entropy < np.log(1000) - 0.4)


def test_stem_statistics_match_imagenet_mean(weights_path):
    """The stem conv is linear, so its ImageNet running mean is the conv of the mean ImageNet pixel.

    A trained stem satisfies this up to crop borders and augmentation. The measured Pearson r is 0.97 with
    RGB input order and 0.55 with BGR, and random weights are expected to give r near 0.
    """
    state_dict = read_state_dict(weights_path)
    kernel_sums = state_dict["_conv_stem.weight"].sum(axis=(2, 3))  # (32 out, 3 in)
    running_mean = state_dict["_bn0.running_mean"]
    imagenet_mean_rgb = np.array([123.675, 116.28, 103.53])

    def correlation(mean_pixel: np.ndarray) -> float:
        scaled = np.asarray(scale_pixels(jnp.asarray(mean_pixel.reshape(1, 1, 1, 3)), BACKBONE.pixel_scaling)).ravel()
        return float(np.corrcoef(kernel_sums @ scaled, running_mean)[0, 1])

    assert correlation(imagenet_mean_rgb) > 0.9
    assert correlation(imagenet_mean_rgb[::-1]) < 0.8


def test_cracked_and_uncracked_features_differ(flax_features):
    cracked, uncracked = flax_features
    relative_distance = np.linalg.norm(cracked - uncracked) / np.linalg.norm(uncracked)

    assert np.all(np.isfinite(flax_features))
    assert np.all(flax_features >= 0.0)  # ReLU6 before pooling
    assert relative_distance > 0.05


def test_loader_names_missing_tensor(tmp_path, torch_state_dict):
    state_dict = dict(torch_state_dict)
    del state_dict["_blocks.7._depthwise_conv.weight"]
    path = tmp_path / "missing.pth"
    torch.save(state_dict, path)

    with pytest.raises(WeightsError) as error:
        BACKBONE.load_params(path)

    assert "_blocks.7._depthwise_conv.weight" in str(error.value)
    assert "missing" in str(error.value)
    assert "missing.pth" in str(error.value)


def test_loader_names_misshaped_tensor(tmp_path, torch_state_dict):
    state_dict = dict(torch_state_dict)
    state_dict["_blocks.3._bn1.running_var"] = torch.ones(143)
    path = tmp_path / "misshaped.pth"
    torch.save(state_dict, path)

    with pytest.raises(WeightsError) as error:
        BACKBONE.load_params(path)

    message = str(error.value)
    assert "_blocks.3._bn1.running_var" in message
    assert "(143,)" in message
    assert "(144,)" in message
    assert "misshaped.pth" in message


def test_loader_rejects_unexpected_tensor(torch_state_dict):
    state_dict = {name: tensor.numpy() for name, tensor in torch_state_dict.items()}
    state_dict["_blocks.0._se_reduce.weight"] = np.zeros((8, 32, 1, 1), np.float32)

    with pytest.raises(WeightsError, match="_blocks.0._se_reduce.weight"):
        convert_state_dict(state_dict, width=1.0, depth=1.0, input_size=224, source="b0.pth")


def test_weights_entry_matches_installed_file(weights_path):
    assert weights_path.name == ENTRY.file_name
    assert weights_path.stat().st_size == ENTRY.size
    assert hashlib.sha256(weights_path.read_bytes()).hexdigest() == ENTRY.file_hash


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_larger_variants_match_torch_reference(name):
    entry = {entry.name: entry for entry in WEIGHTS}[name]
    backbone = {backbone.name: backbone for backbone in BACKBONES}[name]
    path = package_weights_path(entry)
    if path is None:
        pytest.skip(f"package {entry.package} is not installed")
    if not CRACKED_IMAGE.is_file():
        pytest.skip(f"SDNET2018 images not found under {DATASET}")

    size = (backbone.input_size, backbone.input_size)
    image = np.asarray(Image.open(CRACKED_IMAGE).convert("RGB").resize(size, Image.BILINEAR))[None]
    pixels = np.array(scale_pixels(jnp.asarray(image), backbone.pixel_scaling))
    features = np.asarray(jax.jit(backbone.build().apply)(backbone.load_params(path), pixels))

    width, depth = backbone.build().width, backbone.build().depth
    reference = _TorchEfficientNetLite(width=width, depth=depth).eval()
    reference.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    with torch.no_grad():
        expected = reference.features(torch.from_numpy(pixels).permute(0, 3, 1, 2)).numpy()

    assert features.shape == (1, backbone.feature_size)
    max_difference = float(np.max(np.abs(features - expected)))
    print(f"{name} max |flax - torch| over 1 image x 1280 features: {max_difference:.3g}")
    assert max_difference <= 1e-4
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry.file_hash
    assert path.stat().st_size == entry.size


def test_package_weights_path_without_package():
    entry = ENTRY.__class__(**{**ENTRY.__dict__, "package": "crackjax-no-such-package"})

    assert package_weights_path(entry) is None
