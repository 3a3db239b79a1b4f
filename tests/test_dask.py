"""Bottleneck shards mapped over a local Dask cluster of worker processes."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from crackjax.bottleneck import load_feature_matrix
from crackjax.export import read_manifest
from crackjax.store import PartStore
from flows.crack_train import crack_train

prefect_dask = pytest.importorskip("prefect_dask")


def _features(result: dict) -> tuple[list[str], np.ndarray]:
    manifest = read_manifest(result["model_dir"])
    store = PartStore(manifest["features"]["store"])
    keys = sorted({key for path in store.part_paths() for key in pq.read_table(path, columns=["sha256"])["sha256"].to_pylist()})
    return keys, load_feature_matrix(store, keys, manifest["backbone"]["feature_size"])


def test_shards_run_on_dask_workers(tmp_path, small_assets):
    runner = prefect_dask.DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True})
    distributed = crack_train.with_options(task_runner=runner)

    result = distributed(
        assets=str(small_assets), workspace=str(tmp_path / "dask"), backbone="efficientnet_lite0",
        shard_size=10, head={"epochs": 5},
    )
    local = crack_train(assets=str(small_assets), workspace=str(tmp_path / "local"), backbone="efficientnet_lite0", head={"epochs": 5})

    assert result["features_computed"] == 40
    dask_keys, dask_features = _features(result)
    local_keys, local_features = _features(local)
    assert dask_keys == local_keys
    assert len(PartStore(read_manifest(result["model_dir"])["features"]["store"]).part_paths()) == 4
    np.testing.assert_allclose(dask_features, local_features, atol=1e-5)
