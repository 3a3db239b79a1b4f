"""Prediction with missing or damaged inputs and models, and an export killed half-way."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from crackjax.errors import CrackjaxError, ImageError, ModelError
from crackjax.export import list_models, load_head_state, newest_model, read_manifest
from crackjax.predict import Predictor, predict_path

from reliability_helpers import REPO_ROOT, WORKERS


@pytest.fixture(scope="module")
def predictor(trained_workspace):
    return Predictor(trained_workspace["result"]["model_dir"])


def test_predict_missing_file(tmp_path, predictor):
    with pytest.raises(CrackjaxError, match=r"missing\.jpg not found; pass an image file or a folder of images"):
        predict_path(predictor, tmp_path / "missing.jpg")


def test_predict_non_image(tmp_path, predictor):
    path = tmp_path / "report.jpg"
    path.write_text("not a photo", encoding="utf-8")
    with pytest.raises(ImageError) as raised:
        predict_path(predictor, path)
    assert raised.value.path == str(path)
    assert "not an image Pillow can identify" in raised.value.reason


def test_predict_folder_reports_bad_files(tmp_path, predictor, sdnet_images):
    folder = tmp_path / "inspection"
    folder.mkdir()
    shutil.copyfile(sdnet_images["CD"][0], folder / "deck 1.jpg")
    (folder / "deck 2.jpg").write_bytes(b"")
    (folder / ".DS_Store").write_bytes(b"\x00" * 8)

    results = {result.path: result for result in predict_path(predictor, folder)}

    assert sorted(results) == ["deck 1.jpg", "deck 2.jpg"]
    assert results["deck 1.jpg"].label in ("CD", "UD")
    assert results["deck 1.jpg"].error is None
    assert results["deck 2.jpg"].label is None
    assert "not an image" in results["deck 2.jpg"].error


def test_missing_model_folder(tmp_path):
    with pytest.raises(ModelError, match="not found; pass a folder under workspace/models or train a model first"):
        Predictor(tmp_path / "models" / "nothing-here")
    with pytest.raises(ModelError, match="no trained model in"):
        newest_model(tmp_path / "empty-workspace")


def damage_manifest_missing(model: Path) -> None:
    (model / "manifest.json").unlink()


def damage_manifest_garbage(model: Path) -> None:
    (model / "manifest.json").write_text('{"labels": ["CD", "UD"], "backbone": {', encoding="utf-8")


def damage_checkpoint_missing(model: Path) -> None:
    shutil.rmtree(model / "checkpoint")


def largest_checkpoint_file(model: Path) -> Path:
    return max((path for path in (model / "checkpoint").rglob("*") if path.is_file()), key=lambda path: path.stat().st_size)


def damage_checkpoint_byte(model: Path) -> None:
    path = largest_checkpoint_file(model)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def damage_checkpoint_truncated(model: Path) -> None:
    path = largest_checkpoint_file(model)
    path.write_bytes(path.read_bytes()[:100])


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (damage_manifest_missing, "manifest.json not found; .* is not a complete crackjax model folder"),
        (damage_manifest_garbage, "manifest.json is unreadable .*the model folder is corrupt"),
        (damage_checkpoint_missing, "checkpoint not found; the model folder is incomplete"),
        (damage_checkpoint_byte, "has sha256 .*, but the manifest records .*; the model folder is corrupt"),
        (damage_checkpoint_truncated, "has sha256 .*, but the manifest records .*; the model folder is corrupt"),
    ],
    ids=["manifest-missing", "manifest-garbage", "checkpoint-missing", "checkpoint-byte", "checkpoint-truncated"],
)
def test_corrupt_model_rejected(model_copy, damage, expected):
    load_head_state(model_copy)  # the undamaged copy loads
    damage(model_copy)
    with pytest.raises(ModelError, match=expected):
        Predictor(model_copy)


def test_export_killed_keeps_previous_model(tmp_path, model_copy, trained_workspace):
    from crackjax.registry import REGISTRY_NAME, champion_dir

    workspace = tmp_path / "workspace"
    previous = workspace / "models" / model_copy.name
    shutil.copytree(model_copy, previous)
    before = load_head_state(previous)
    manifest_before = (previous / "manifest.json").read_bytes()
    # The trained workspace's registry lists this model (the same id) as its champion.
    shutil.copyfile(trained_workspace["workspace"] / "models" / REGISTRY_NAME, workspace / "models" / REGISTRY_NAME)
    registry_before = (workspace / "models" / REGISTRY_NAME).read_bytes()
    assert champion_dir(workspace).name == model_copy.name

    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS="cpu")
    arguments = json.dumps({"source_model": str(previous), "workspace": str(workspace), "count": 100})
    worker = subprocess.Popen([sys.executable, str(WORKERS), "export_loop", arguments], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Kill while the second export's folder is being assembled: its checkpoint is
    # being written and its manifest is not there yet.
    deadline = time.monotonic() + 120
    while True:
        assert worker.poll() is None, worker.communicate()
        assert time.monotonic() < deadline, "the export did not start within 120 s"
        assembling = workspace / "models" / ".tmp-loop-0001"
        if (assembling / "checkpoint").exists() and not (assembling / "manifest.json").exists():
            worker.send_signal(signal.SIGKILL)
            break
        time.sleep(0.001)
    worker.communicate()

    assert assembling.exists()  # the kill landed half-way
    listed = [Path(manifest["path"]).name for manifest in list_models(workspace)]
    assert ".tmp-loop-0001" not in listed
    assert "loop-0001" not in listed
    assert set(listed) == {model_copy.name, "loop-0000"}
    assert (previous / "manifest.json").read_bytes() == manifest_before
    after = load_head_state(previous)
    for layer, values in before["params"].items():
        for name, value in values.items():
            np.testing.assert_array_equal(after["params"][layer][name], value)
    read_manifest(workspace / "models" / "loop-0000")
    load_head_state(workspace / "models" / "loop-0000")
    assert (workspace / "models" / REGISTRY_NAME).read_bytes() == registry_before
    assert champion_dir(workspace).name == model_copy.name
