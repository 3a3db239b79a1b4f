"""crack-train end to end with a ResNet-v2-50 weights file in the Keras 2 `.h5` layout.

No pretrained weights can be downloaded here, so the file contains random values from
Keras 3 (JAX backend) and is placed in the weights cache, as a user would place a
file downloaded elsewhere. This proves the whole path: registry, cache, `.h5` loader,
bottleneck, head, export and predict.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from crackjax.backbones import get_weights_entry  # noqa: E402
from crackjax.export import read_manifest  # noqa: E402
from crackjax.predict import Predictor, predict_path  # noqa: E402
from crackjax.weights.cache import cached_path  # noqa: E402
from flows.crack_train import crack_train  # noqa: E402

keras = pytest.importorskip("keras")
legacy_h5_format = pytest.importorskip("keras.src.legacy.saving.legacy_h5_format")


def test_flow_with_resnet_v2_50_in_cache(tmp_path, monkeypatch, small_assets):
    if keras.backend.backend() != "jax":
        pytest.skip(f"Keras runs on the {keras.backend.backend()} backend; set KERAS_BACKEND=jax")
    monkeypatch.setenv("CRACKJAX_CACHE", str(tmp_path / "cache"))
    entry = get_weights_entry("resnet_v2_50")
    target = cached_path(entry)
    target.parent.mkdir(parents=True)
    model = keras.applications.ResNet50V2(weights=None, include_top=False, input_shape=(224, 224, 3))
    with h5py.File(target, "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, model)

    # The random file cannot match the md5 Keras publishes, so it is passed as an
    # explicit path at its cache location instead of being verified from the cache.
    result = crack_train(
        assets=str(small_assets), workspace=str(tmp_path / "workspace"), backbone="resnet_v2_50",
        weights=str(target), head={"epochs": 10},
    )

    manifest = read_manifest(result["model_dir"])
    assert manifest["backbone"]["name"] == "resnet_v2_50"
    assert manifest["backbone"]["weights"] == "resnet_v2_50"
    assert manifest["backbone"]["feature_size"] == 2048
    assert result["features_computed"] == 40
    predictions = predict_path(Predictor(result["model_dir"], weights_path=target), small_assets / "CD")
    assert len(predictions) == 20
    assert all(np.isfinite(prediction.probability) for prediction in predictions)
