"""crack-train and predict with the ONNX Runtime engine for the bottleneck."""

from __future__ import annotations

import numpy as np

from crackjax.export import read_manifest
from crackjax.predict import Predictor, predict_path
from flows.crack_train import crack_train


def test_onnxruntime_engine_trains_and_predicts(tmp_path, small_assets):
    workspace = tmp_path / "workspace"

    onnx_run = crack_train(assets=str(small_assets), workspace=str(workspace), backbone="efficientnet_lite0", engine="onnxruntime", head={"epochs": 5})
    xla_run = crack_train(assets=str(small_assets), workspace=str(workspace), backbone="efficientnet_lite0", engine="xla", head={"epochs": 5})

    onnx_manifest = read_manifest(onnx_run["model_dir"])
    xla_manifest = read_manifest(xla_run["model_dir"])
    assert onnx_manifest["backbone"]["engine"] == "onnxruntime"
    assert xla_manifest["backbone"]["engine"] == "xla"
    assert onnx_manifest["features"]["store"] != xla_manifest["features"]["store"]
    assert onnx_run["features_computed"] == 40
    assert xla_run["features_computed"] == 40

    onnx_predictions = predict_path(Predictor(onnx_run["model_dir"]), small_assets)
    xla_engine_predictions = predict_path(Predictor(onnx_run["model_dir"], engine="xla"), small_assets)
    assert len(onnx_predictions) == 40
    for onnx_prediction, xla_prediction in zip(onnx_predictions, xla_engine_predictions):
        assert onnx_prediction.path == xla_prediction.path
        assert np.isclose(onnx_prediction.probability, xla_prediction.probability, atol=1e-4)


def test_default_engine_is_the_calibrated_one(tmp_path, small_assets):
    from crackjax.backbones import file_sha256, resolve_backbone
    from crackjax.engines import choose_engine

    run = crack_train(assets=str(small_assets), workspace=str(tmp_path / "workspace"), backbone="efficientnet_lite0", head={"epochs": 5})

    resolved = resolve_backbone("efficientnet_lite0")
    expected = choose_engine("auto", "efficientnet_lite0", resolved.weights.name, resolved.weights_path, file_sha256(resolved.weights_path))
    manifest = read_manifest(run["model_dir"])
    assert manifest["backbone"]["engine"] == expected.engine
    assert expected.calibration is not None
    assert run["features_computed"] == 40
    predictor = Predictor(run["model_dir"])
    assert predictor.backbone.engine == expected.engine
    predictions = predict_path(predictor, small_assets)
    assert len(predictions) == 40 and all(prediction.error is None for prediction in predictions)
