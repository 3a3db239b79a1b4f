"""Two crack-train runs on one workspace at once: caches and the registry stay consistent."""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow.parquet as pq

from crackjax.export import list_models
from crackjax.registry import list_versions
from crackjax.store import PartStore


def test_overlapping_runs_share_one_model(tmp_path, small_assets):
    workspace = tmp_path / "workspace"
    command = [sys.executable, "-m", "crackjax", "train", str(small_assets), "--workspace", str(workspace), "--backbone", "efficientnet_lite0", "--epochs", "5"]
    processes = []
    for index in range(2):
        env = dict(os.environ, PREFECT_HOME=str(tmp_path / f"prefect-{index}"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
        env.pop("PREFECT_API_URL", None)
        processes.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path))
    outputs = [process.communicate(timeout=400)[0] for process in processes]

    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output
        assert "Traceback" not in output
    models = list_models(workspace)
    assert len(models) == 1
    versions = list_versions(workspace)
    assert [version["version"] for version in versions] == [1]
    (store_folder,) = (workspace / "features").iterdir()
    keys = [key for path in PartStore(store_folder).part_paths() for key in pq.read_table(path, columns=["sha256"])["sha256"].to_pylist()]
    assert len(set(keys)) == 40
    assert not list(store_folder.glob(".tmp-*"))
