"""The `crackjax` command line as a user runs it, in subprocesses."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from crackjax.export import read_manifest


def _run(args: list[str], tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    env["CRACKJAX_CACHE"] = str(tmp_path / "cache")
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env.pop("PREFECT_API_URL", None)
    return subprocess.run([sys.executable, "-m", "crackjax", *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)


def test_train_falls_back_without_resnet_weights(tmp_path, small_assets):
    workspace = tmp_path / "workspace"

    completed = _run(["train", str(small_assets), "--workspace", str(workspace), "--epochs", "20"], tmp_path)

    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    assert "Traceback" not in output
    assert "| ERROR" not in output
    assert "so this run uses efficientnet_lite0" in output
    assert "crackjax weights fetch resnet_v2_101" in output
    assert "epoch 20/20: train loss" in output
    assert "confusion matrix" in output
    model_line = [line for line in completed.stdout.splitlines() if line.startswith("model: ")][-1]
    manifest = read_manifest(model_line.removeprefix("model: "))
    assert manifest["backbone"]["name"] == "efficientnet_lite0"
    assert manifest["backbone"]["requested"] is None
    assert "resnet_v2_101" in manifest["backbone"]["fallback_reason"]

    predicted = _run(["predict", str(small_assets / "CD"), "--workspace", str(workspace), "--json"], tmp_path)
    assert predicted.returncode == 0, predicted.stderr
    rows = json.loads(predicted.stdout)
    assert len(rows) == 20
    assert {row["label"] for row in rows} <= {"CD", "UD"}

    single = _run(["predict", str(next((small_assets / "UD").iterdir())), "--workspace", str(workspace)], tmp_path)
    assert single.returncode == 0, single.stderr
    assert single.stdout.splitlines()[0].split() == ["path", "label", "probability"]

    table = _run(["predict", str(small_assets), "--workspace", str(workspace), "--csv", "--output", str(tmp_path / "out.csv")], tmp_path)
    assert table.returncode == 0, table.stderr
    with open(tmp_path / "out.csv", newline="") as handle:
        records = list(csv.DictReader(handle))
    assert len(records) == 40
    assert {record["true_label"] for record in records} == {"CD", "UD"}


def test_explicit_resnet_without_weights_fails_clearly(tmp_path, small_assets):
    completed = _run(["train", str(small_assets), "--workspace", str(tmp_path / "ws"), "--backbone", "resnet_v2_101"], tmp_path)

    output = completed.stdout + completed.stderr
    assert completed.returncode == 1
    assert "Traceback" not in output
    assert "crackjax: error:" in completed.stderr
    assert "resnet101v2_weights_tf_dim_ordering_tf_kernels_notop.h5" in completed.stderr


def test_bfloat16_rejected_on_deck_photos(tmp_path, sdnet_dir):
    workspace = tmp_path / "workspace"

    completed = _run(["train", str(sdnet_dir), "--workspace", str(workspace), "--backbone", "efficientnet_lite0", "--compute-dtype", "bfloat16"], tmp_path)

    assert completed.returncode == 1, completed.stdout + completed.stderr
    assert "Traceback" not in completed.stderr
    assert "crackjax: error: bfloat16 features of efficientnet_lite0 reach a min cosine similarity of only" in completed.stderr
    assert "train with --compute-dtype float32" in completed.stderr
    assert list(workspace.glob("pixels/*/part-*.parquet")), "preprocess should have run before the check"
    assert not list(workspace.glob("features/*"))
    assert not (workspace / "models").exists()


def test_local_dask_workers_share_the_cpus(tmp_path, small_assets):
    workers = 2
    completed = _run(
        ["train", str(small_assets), "--workspace", str(tmp_path / "workspace"), "--backbone", "efficientnet_lite0",
         "--dask-workers", str(workers), "--shard-size", "20", "--epochs", "5"],
        tmp_path,
    )

    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    # The flow process calibrates with every CPU; the workers, which compute the shards, get a share.
    share = max(1, (os.cpu_count() or 1) // workers)
    thread_counts = re.findall(r"ONNX Runtime session \(intra-op threads: (\d+)\)", output)
    assert str(share) in thread_counts[1:], output
    assert "bottleneck: 40 images, 0 cached, 40 computed" in output


def test_unknown_backbone_lists_known_names(tmp_path, small_assets):
    completed = _run(["train", str(small_assets), "--backbone", "resnet_v3"], tmp_path)

    assert completed.returncode == 1
    assert "unknown backbone 'resnet_v3'" in completed.stderr
    assert "efficientnet_lite0" in completed.stderr
    assert "Traceback" not in completed.stdout + completed.stderr


def test_weights_list_shows_every_backbone(tmp_path):
    completed = _run(["weights", "list", "--json"], tmp_path)

    assert completed.returncode == 0, completed.stderr
    names = {row["name"] for row in json.loads(completed.stdout)}
    for name in ("resnet_v2_50", "resnet_v2_101", "resnet_v2_152", "bit_m_r50x1", "bit_s_r101x1", "efficientnet_lite0"):
        assert name in names


def test_predict_without_model_fails_clearly(tmp_path):
    completed = _run(["predict", ".", "--workspace", str(tmp_path / "empty")], tmp_path)

    assert completed.returncode == 1
    assert "no trained model" in completed.stderr
    assert "Traceback" not in completed.stderr
