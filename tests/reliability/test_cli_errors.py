"""Input problems through the real `python -m crackjax` command: one message, no traceback.

Each `train` run starts Prefect's temporary server (10 to 25 s on 2 cores), so only
two go through it: one that succeeds with rejected files and one that fails inside a
Prefect task. The library tests cover the other cases.
"""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import pytest

from reliability_helpers import link_images, run_cli


def assert_clean_failure(child, *fragments: str) -> None:
    output = child.stdout + child.stderr
    assert child.returncode == 1, output
    assert "Traceback" not in output
    for fragment in fragments:
        assert fragment in child.stderr, child.stderr


@pytest.fixture
def assets(tmp_path, sdnet_images):
    """20 real images per label with one truncated JPEG, a text file and a hidden file."""
    root = tmp_path / "assets"
    for label, paths in sdnet_images.items():
        link_images(root / label, paths[:20])
    data = sdnet_images["CD"][-1].read_bytes()
    (root / "CD" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "UD" / "notes.txt").write_text("deck 7001 inspected", encoding="utf-8")
    (root / "UD" / ".DS_Store").write_bytes(b"\x00" * 8)
    return root


def test_train_skips_bad_files_and_reports_them(tmp_path, assets, workspace_copy):
    # The copied workspace contains features for these images, so no bottleneck runs.
    child = run_cli(
        tmp_path, "train", str(assets), "--workspace", str(workspace_copy), "--backbone", "efficientnet_lite0",
        "--validation-fraction", "0.5", "--epochs", "20",
    )
    output = child.stdout + child.stderr

    assert child.returncode == 0, output
    assert "Traceback" not in output
    assert "skipped CD/truncated.jpg: cannot decode image" in output
    assert "skipped UD/notes.txt: unsupported file type '.txt'" in output
    (model,) = (path for path in (workspace_copy / "models").iterdir() if path.is_dir())
    with open(model / "rejected.csv", newline="", encoding="utf-8") as handle:
        rows = {row["path"]: row["reason"] for row in csv.DictReader(handle)}
    assert set(rows) == {"CD/truncated.jpg", "UD/notes.txt"}
    assert "image file is truncated" in rows["CD/truncated.jpg"]
    dataset_reports = list((workspace_copy / "datasets").rglob("rejected.csv"))
    assert len(dataset_reports) == 2  # one from ingest, one from preprocess


def test_train_strict_fails_on_truncated_jpeg(tmp_path, assets):
    # The truncated JPEG's header reads, so ingest keeps it and the preprocess task fails on it.
    (assets / "UD" / "notes.txt").unlink()
    child = run_cli(tmp_path, "train", str(assets), "--workspace", str(tmp_path / "workspace"), "--backbone", "efficientnet_lite0", "--strict")
    assert_clean_failure(
        child, f"crackjax: error: {assets / 'CD' / 'truncated.jpg'}: cannot decode image", "image file is truncated", "--strict stops at the first unreadable file"
    )


def test_train_missing_folder_fails_before_flow(tmp_path):
    child = run_cli(tmp_path, "train", str(tmp_path / "no such folder"))
    assert_clean_failure(child, "image folder", "no such folder not found")
    assert "Starting temporary server" not in child.stderr


def test_predict_missing_file(tmp_path):
    child = run_cli(tmp_path, "predict", str(tmp_path / "deck.jpg"), "--workspace", str(tmp_path))
    assert_clean_failure(child, f"crackjax: error: {tmp_path / 'deck.jpg'} not found; pass an image file or a folder of images")


def test_predict_non_image(tmp_path, trained_workspace):
    path = tmp_path / "deck.jpg"
    path.write_text("not a photo", encoding="utf-8")
    child = run_cli(tmp_path, "predict", str(path), "--model", trained_workspace["result"]["model_dir"])
    assert_clean_failure(child, f"crackjax: error: {path}: not an image Pillow can identify")


def test_predict_without_model(tmp_path, sdnet_images):
    child = run_cli(tmp_path, "predict", str(sdnet_images["CD"][0]), "--workspace", str(tmp_path / "workspace"))
    assert_clean_failure(child, "crackjax: error: no trained model in", "run `crackjax train` first")

    child = run_cli(tmp_path, "predict", str(sdnet_images["CD"][0]), "--model", str(tmp_path / "models" / "gone"))
    assert_clean_failure(child, "crackjax: error: model", str(tmp_path / "models" / "gone"))


def test_predict_corrupt_model(tmp_path, model_copy, sdnet_images):
    checkpoint_files = sorted(path for path in (model_copy / "checkpoint").rglob("*") if path.is_file())
    largest = max(checkpoint_files, key=lambda path: path.stat().st_size)
    largest.write_bytes(largest.read_bytes()[:-1] + b"\x00")
    child = run_cli(tmp_path, "predict", str(sdnet_images["CD"][0]), "--model", str(model_copy))
    assert_clean_failure(child, f"crackjax: error: checkpoint file {largest.resolve()}", "the model folder is corrupt, so train again")
