"""The crack-train flow end to end on the 400 real SDNET2018 images, and its caching."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from crackjax.bottleneck import load_feature_matrix
from crackjax.export import list_models, load_head_state, read_manifest
from crackjax.head import predict_proba
from crackjax.predict import Predictor, predict_path
from crackjax.store import PartStore
from flows.crack_train import crack_train
from sdnet_paths import link_labelled


def _task_states(flow_state) -> dict[str, list[str]]:
    """Return the state names of the flow run's task runs, by task name."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_run_id = flow_state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    states: dict[str, list[str]] = {}
    for run in task_runs:
        states.setdefault(run.name.rsplit("-", 1)[0], []).append(run.state.name)
    return states


def test_flow_trains_and_exports(trained_workspace):
    result = trained_workspace["result"]
    model_dir = Path(result["model_dir"])

    manifest = read_manifest(model_dir)
    assert manifest["labels"] == ["CD", "UD"]
    assert manifest["backbone"]["name"] == "efficientnet_lite0"
    assert len(manifest["backbone"]["weights_sha256"]) == 64
    assert manifest["data"]["counts"] == {
        "CD": {"train": 140, "validation": 54, "test": 6},
        "UD": {"train": 140, "validation": 54, "test": 6},
    }
    assert result["features_computed"] == 400
    for name in ("metrics.json", "history.json", "rejected.csv", "checkpoint"):
        assert (model_dir / name).exists(), name

    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["test"]["count"] == 12
    assert metrics["validation"]["count"] == 108
    assert np.sum(metrics["test"]["confusion_matrix"]) == 12
    # A logistic regression on the same frozen features reaches about 0.85 in 5-fold
    # cross-validation; the head must do as well on the validation split.
    assert metrics["validation"]["accuracy"] >= 0.85
    assert metrics["test"]["roc_auc"] > 0.8


def test_rerun_unchanged_is_cached(trained_workspace, sdnet_dir):
    first = trained_workspace["result"]

    state = crack_train(assets=str(sdnet_dir), workspace=str(trained_workspace["workspace"]), backbone="efficientnet_lite0", return_state=True)
    result = state.result()
    states = _task_states(state)

    for stage in ("ingest", "preprocess", "train", "evaluate", "export"):
        assert states[stage] == ["Cached"], stage
    assert "bottleneck-shard" not in states
    assert result["features_computed"] == 0
    assert result["features_cached"] == 400
    assert result["model_id"] == first["model_id"]


def test_head_change_reruns_head_stages_only(trained_workspace, sdnet_dir):
    state = crack_train(
        assets=str(sdnet_dir), workspace=str(trained_workspace["workspace"]), backbone="efficientnet_lite0",
        head={"epochs": 30, "schedule": "exponential"}, return_state=True,
    )
    result = state.result()
    states = _task_states(state)

    assert states["ingest"] == ["Cached"]
    assert states["preprocess"] == ["Cached"]
    assert "bottleneck-shard" not in states
    for stage in ("train", "evaluate", "export"):
        assert states[stage] == ["Completed"], stage
    assert result["model_id"] != trained_workspace["result"]["model_id"]
    history = json.loads((Path(result["model_dir"]) / "history.json").read_text())
    assert len(history) == 30


def test_added_image_computes_only_its_features(tmp_path, sdnet_images, workspace_copy):
    assets = link_labelled(tmp_path / "assets", sdnet_images)
    with Image.open(sdnet_images["CD"][0]) as image:
        image.rotate(90).save(assets / "CD" / "new-rotated.jpg", quality=95)

    result = crack_train(assets=str(assets), workspace=str(workspace_copy), backbone="efficientnet_lite0")

    assert result["features_computed"] == 1
    assert result["features_cached"] == 400


def test_predict_matches_pipeline_features(trained_workspace, sdnet_dir):
    model_dir = Path(trained_workspace["result"]["model_dir"])
    manifest = read_manifest(model_dir)
    (dataset_path,) = Path(trained_workspace["workspace"]).glob("datasets/*/*/dataset.parquet")
    dataset = pq.read_table(dataset_path)
    test_rows = dataset.filter(pc.equal(dataset["split"], "test"))
    paths = sorted(set(test_rows["path"].to_pylist()))

    predictor = Predictor(model_dir)
    predictions = predictor.predict_files([sdnet_dir / path for path in paths], root=sdnet_dir)

    store = PartStore(manifest["features"]["store"])
    sha_of = dict(zip(test_rows["path"].to_pylist(), test_rows["sha256"].to_pylist()))
    stored = load_feature_matrix(store, [sha_of[path] for path in paths], manifest["backbone"]["feature_size"])
    state = load_head_state(model_dir)
    expected = predict_proba(state["params"], state["feature_mean"], state["feature_std"], stored, 2, 0)
    for prediction, row in zip(predictions, expected):
        assert prediction.probabilities["CD"] == pytest.approx(float(row[0]), abs=1e-4)
        assert prediction.true_label == prediction.path.split("/")[0]


def test_predict_folder_reports_true_labels(trained_workspace, sdnet_images, tmp_path):
    folder = link_labelled(tmp_path / "inspect", sdnet_images, slice(-5, None))

    results = predict_path(Predictor(trained_workspace["result"]["model_dir"]), folder)

    assert len(results) == 10
    assert {result.true_label for result in results} == {"CD", "UD"}
    for result in results:
        assert result.label in ("CD", "UD")
        assert sum(result.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert result.probability == max(result.probabilities.values())
    assert len(list_models(trained_workspace["workspace"])) >= 1
