"""BiT ResNet-v2 backbones and the `.npz` loader, checked against an independent torch reference.

timm's ResNetV2 cannot serve as the reference here: timm 1.0.31 imports torchvision
at `import timm.models.resnetv2`, and torchvision does not install beside this torch.
The reference below is written in plain torch from the official JAX code
(`bit_jax/models.py` in google-research/big_transfer). It keeps its own torch-style
module names and maps the `.npz` names onto them itself.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from sdnet_paths import SDNET_DIR
from crackjax.backbones import bit
from crackjax.backbones.base import MINUS_ONE_TO_ONE, scale_pixels
from crackjax.weights.bit_npz import load_bit_npz
from crackjax.weights.entry import WeightsError, WeightsMissingError

DATASET = SDNET_DIR
IMAGES = (DATASET / "CD" / "7001-115.jpg", DATASET / "UD" / "7001-100.jpg")
TOLERANCE = 1e-4


def _random_bit_arrays(block_sizes, width_factor: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Return random float32 tensors named and shaped as in an official BiT `.npz` file.

    Kernels get a random per-output-channel offset and scale, so weight
    standardization has real work to do. GroupNorm gammas and betas are random too.
    The classifier head has 10 classes; the loader must ignore it whatever its size.
    """
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}

    def add_kernel(name: str, shape: tuple[int, int, int, int]) -> None:
        offset = rng.normal(0.0, 0.2, size=(1, 1, 1, shape[-1]))
        scale = rng.uniform(0.1, 2.0, size=(1, 1, 1, shape[-1]))
        arrays[name] = (offset + scale * rng.standard_normal(shape)).astype(np.float32)

    def add_group_norm(name: str, channels: int) -> None:
        arrays[f"{name}/gamma"] = rng.uniform(0.5, 1.5, size=channels).astype(np.float32)
        arrays[f"{name}/beta"] = rng.normal(0.0, 0.3, size=channels).astype(np.float32)

    base_width = 64 * width_factor
    add_kernel("resnet/root_block/standardized_conv2d/kernel", (7, 7, 3, base_width))

    in_channels = base_width
    for stage, num_units in enumerate(block_sizes, start=1):
        width = base_width * 2 ** (stage - 1)
        for unit in range(1, num_units + 1):
            prefix = f"resnet/block{stage}/unit{unit:02d}"
            add_group_norm(f"{prefix}/a/group_norm", in_channels)
            add_kernel(f"{prefix}/a/standardized_conv2d/kernel", (1, 1, in_channels, width))
            if unit == 1:
                add_kernel(f"{prefix}/a/proj/standardized_conv2d/kernel", (1, 1, in_channels, 4 * width))
            add_group_norm(f"{prefix}/b/group_norm", width)
            add_kernel(f"{prefix}/b/standardized_conv2d/kernel", (3, 3, width, width))
            add_group_norm(f"{prefix}/c/group_norm", width)
            add_kernel(f"{prefix}/c/standardized_conv2d/kernel", (1, 1, width, 4 * width))
            in_channels = 4 * width

    add_group_norm("resnet/group_norm", in_channels)
    arrays["resnet/head/conv2d/kernel"] = rng.standard_normal((1, 1, in_channels, 10)).astype(np.float32)
    arrays["resnet/head/conv2d/bias"] = rng.standard_normal(10).astype(np.float32)
    return arrays


def _torch_reference(block_sizes, width_factor: int, arrays: dict[str, np.ndarray]):
    """Build the torch reference BiT ResNet-v2 and load `arrays` (official `.npz` names) into it."""
    torch = pytest.importorskip("torch")
    functional = torch.nn.functional

    class StdConv2d(torch.nn.Conv2d):
        def forward(self, x):
            weight = self.weight
            mean = weight.mean(dim=(1, 2, 3), keepdim=True)
            variance = weight.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
            weight = (weight - mean) / torch.sqrt(variance + 1e-10)
            return functional.conv2d(x, weight, None, self.stride, self.padding)

    def group_norm(channels):
        return torch.nn.GroupNorm(32, channels, eps=1e-5)

    class Bottleneck(torch.nn.Module):
        def __init__(self, in_channels, width, stride):
            super().__init__()
            self.norm1 = group_norm(in_channels)
            self.conv1 = StdConv2d(in_channels, width, 1, bias=False)
            self.norm2 = group_norm(width)
            self.conv2 = StdConv2d(width, width, 3, stride=stride, padding=1, bias=False)
            self.norm3 = group_norm(width)
            self.conv3 = StdConv2d(width, 4 * width, 1, bias=False)
            self.downsample = None
            if stride != 1 or in_channels != 4 * width:
                self.downsample = StdConv2d(in_channels, 4 * width, 1, stride=stride, bias=False)

        def forward(self, x):
            preact = functional.relu(self.norm1(x))
            shortcut = x if self.downsample is None else self.downsample(preact)
            y = self.conv1(preact)
            y = self.conv2(functional.relu(self.norm2(y)))
            y = self.conv3(functional.relu(self.norm3(y)))
            return y + shortcut

    class ReferenceBiT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            base_width = 64 * width_factor
            self.stem = StdConv2d(3, base_width, 7, stride=2, padding=3, bias=False)
            self.stages = torch.nn.ModuleList()
            in_channels = base_width
            for index, num_units in enumerate(block_sizes):
                width = base_width * 2**index
                units = []
                for unit in range(num_units):
                    stride = 2 if index > 0 and unit == 0 else 1
                    units.append(Bottleneck(in_channels, width, stride))
                    in_channels = 4 * width
                self.stages.append(torch.nn.Sequential(*units))
            self.norm = group_norm(in_channels)

        def forward(self, x):
            x = self.stem(x)
            x = functional.max_pool2d(functional.pad(x, (1, 1, 1, 1), value=0.0), 3, stride=2)
            for stage in self.stages:
                x = stage(x)
            return functional.relu(self.norm(x)).mean(dim=(2, 3))

    def npz_name(torch_name: str) -> str:
        parts = torch_name.split(".")
        if parts[0] == "stem":
            return "resnet/root_block/standardized_conv2d/kernel"
        if parts[0] == "norm":
            return "resnet/group_norm/" + ("gamma" if parts[1] == "weight" else "beta")
        stage, unit, layer, kind = int(parts[1]), int(parts[2]), parts[3], parts[-1]
        prefix = f"resnet/block{stage + 1}/unit{unit + 1:02d}"
        if layer == "downsample":
            return f"{prefix}/a/proj/standardized_conv2d/kernel"
        letter = "abc"[int(layer[-1]) - 1]
        if layer.startswith("conv"):
            return f"{prefix}/{letter}/standardized_conv2d/kernel"
        return f"{prefix}/{letter}/group_norm/" + ("gamma" if kind == "weight" else "beta")

    model = ReferenceBiT().eval()
    state = {}
    for torch_name, tensor in model.state_dict().items():
        array = arrays[npz_name(torch_name)]
        if array.ndim == 4:
            array = array.transpose(3, 2, 0, 1)  # (h, w, in, out) to torch's (out, in, h, w)
        assert tuple(array.shape) == tuple(tensor.shape), torch_name
        state[torch_name] = torch.from_numpy(np.ascontiguousarray(array))
    model.load_state_dict(state)
    return model


def _sdnet_pixels() -> np.ndarray:
    """Return the two SDNET images, center-cropped from 256 to 224, as `(2, 224, 224, 3) uint8`."""
    start = (256 - bit.INPUT_SIZE) // 2
    crops = []
    for path in IMAGES:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        crops.append(pixels[start : start + bit.INPUT_SIZE, start : start + bit.INPUT_SIZE])
    return np.stack(crops)


@pytest.fixture(scope="module")
def r50_arrays() -> dict[str, np.ndarray]:
    return _random_bit_arrays(bit.BLOCK_SIZES[50], width_factor=1)


def _by_name(name: str):
    return next(backbone for backbone in bit.BACKBONES if backbone.name == name)


def test_r50x1_matches_torch_reference(r50_arrays, tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "BiT-M-R50x1.npz"
    np.savez(path, **r50_arrays)

    backbone = _by_name("bit_m_r50x1")
    variables = backbone.load_params(path)
    module = backbone.build()
    pixels = _sdnet_pixels()
    scaled = scale_pixels(jnp.asarray(pixels), backbone.pixel_scaling)

    features = np.asarray(jax.jit(module.apply)(variables, scaled))

    reference = _torch_reference(bit.BLOCK_SIZES[50], 1, r50_arrays)
    inputs = torch.from_numpy(np.asarray(scaled).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        expected = reference(inputs).numpy()
        # The float64 run is closer to the exact result, so it shows how far
        # the float32 outputs of both sides are from it.
        expected_float64 = reference.double()(inputs.double()).numpy()

    max_difference = float(np.max(np.abs(features - expected)))
    max_difference_float64 = float(np.max(np.abs(features - expected_float64)))
    print(
        f"R50x1 max abs difference to the torch reference: {max_difference:.3g} (float32), "
        f"{max_difference_float64:.3g} (float64)"
    )
    assert features.shape == (2, 2048)
    assert expected.shape == (2, 2048)
    assert np.all(np.isfinite(features))
    # The features must carry signal, else a match would prove little.
    assert float(np.std(features)) > 1e-2
    assert float(np.max(np.abs(features[0] - features[1]))) > 1e-2
    assert max_difference <= TOLERANCE
    assert max_difference_float64 <= TOLERANCE


def test_r101x1_names_match_official_layout():
    expected_names = {name for name in _random_bit_arrays((3, 4, 23, 3), 1) if not name.startswith("resnet/head/")}

    model = bit.build_model(101)
    sample = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), sample)["params"]
    flat = traverse_util.flatten_dict(shapes, sep="/")

    assert {"resnet/" + name for name in flat} == expected_names
    assert flat["block3/unit23/c/standardized_conv2d/kernel"].shape == (1, 1, 256, 1024)
    assert flat["group_norm/gamma"].shape == (2048,)


def test_r101x1_loads_through_backbone(tmp_path):
    arrays = _random_bit_arrays((3, 4, 23, 3), 1, seed=1)
    path = tmp_path / "BiT-S-R101x1.npz"
    np.savez(path, **arrays)

    variables = _by_name("bit_s_r101x1").load_params(path)

    loaded = variables["params"]["block3"]["unit23"]["b"]["group_norm"]["gamma"]
    np.testing.assert_array_equal(loaded, arrays["resnet/block3/unit23/b/group_norm/gamma"])


def test_loader_names_missing_tensor(r50_arrays, tmp_path):
    arrays = dict(r50_arrays)
    missing = "resnet/block2/unit01/a/proj/standardized_conv2d/kernel"
    del arrays[missing]
    path = tmp_path / "missing.npz"
    np.savez(path, **arrays)

    with pytest.raises(WeightsError) as raised:
        bit.load_params(path, depth=50)

    message = str(raised.value)
    assert missing in message
    assert str(path) in message
    assert "(1, 1, 256, 512)" in message


def test_loader_names_misshaped_tensor(r50_arrays, tmp_path):
    arrays = dict(r50_arrays)
    misshaped = "resnet/block3/unit02/b/group_norm/gamma"
    arrays[misshaped] = np.ones(255, np.float32)
    path = tmp_path / "misshaped.npz"
    np.savez(path, **arrays)

    with pytest.raises(WeightsError) as raised:
        bit.load_params(path, depth=50)

    message = str(raised.value)
    assert misshaped in message
    assert str(path) in message
    assert "(255,)" in message
    assert "(256,)" in message


def test_loader_rejects_deeper_network(r50_arrays, tmp_path):
    arrays = dict(r50_arrays)
    extra = "resnet/block3/unit07/a/group_norm/gamma"
    arrays[extra] = np.ones(1024, np.float32)
    path = tmp_path / "deeper.npz"
    np.savez(path, **arrays)

    with pytest.raises(WeightsError) as raised:
        bit.load_params(path, depth=50)

    assert extra in str(raised.value)
    assert str(path) in str(raised.value)


def test_loader_rejects_non_npz_file(tmp_path):
    expected = {"group_norm": {"gamma": np.zeros(4)}}
    html = tmp_path / "html.npz"
    html.write_bytes(b"<html>not a checkpoint</html>")
    bare_array = tmp_path / "bare.npy"
    np.save(bare_array, np.zeros(4, np.float32))

    for path in (html, bare_array):
        with pytest.raises(WeightsError, match="not a valid .npz") as raised:
            load_bit_npz(path, expected)
        assert str(path) in str(raised.value)


def test_loader_reports_missing_file(tmp_path):
    path = tmp_path / "absent.npz"

    with pytest.raises(WeightsMissingError, match="not found") as raised:
        load_bit_npz(path, {"group_norm": {"gamma": np.zeros(4)}})

    assert str(path) in str(raised.value)


def test_backbones_and_weights_entries():
    names = [backbone.name for backbone in bit.BACKBONES]
    assert names == ["bit_m_r50x1", "bit_s_r50x1", "bit_m_r101x1", "bit_s_r101x1"]

    for backbone in bit.BACKBONES:
        assert backbone.input_size == 224
        assert backbone.feature_size == 2048
        assert backbone.pixel_scaling == MINUS_ONE_TO_ONE
        assert backbone.weights == backbone.name

    urls = {entry.name: entry.url for entry in bit.WEIGHTS}
    assert urls["bit_m_r50x1"] == "https://storage.googleapis.com/bit_models/BiT-M-R50x1.npz"
    assert urls["bit_s_r101x1"] == "https://storage.googleapis.com/bit_models/BiT-S-R101x1.npz"
    for entry in bit.WEIGHTS:
        assert entry.license == "Apache-2.0"
        assert entry.file_hash is None
        assert entry.hash_algorithm is None
        assert entry.size is None
        assert entry.backbone in names
