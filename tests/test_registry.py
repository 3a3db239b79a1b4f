"""Model registry: versions, lineage, promotion rule, champion lookup, concurrent registrations."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from crackjax import registry
from crackjax.errors import CrackjaxError, ModelError
from crackjax.export import export_model, newest_model

REPO_ROOT = Path(__file__).resolve().parents[1]
FEATURE_SIZE = 8
LABELS = ["CD", "UD"]
SOURCE = {"name": "efficientnet_lite0", "weights_sha256": "ab" * 32, "compute_dtype": "float32", "engine": "xla", "preprocess_key": "pre-1"}


def make_validation(seed: int, digest: str = "d1", count: int = 40) -> registry.ValidationSet:
    """A validation set whose label is the sign of feature 0, so a head's quality is known."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(count, FEATURE_SIZE)).astype(np.float32)
    label_ids = (features[:, 0] > 0).astype(np.int64)
    return registry.ValidationSet(digest, list(LABELS), label_ids, [Path(f"img{i}.jpg") for i in range(count)], features, dict(SOURCE))


def make_model(workspace: Path, model_id: str, strength: float, *, digest: str = "d1", labels=LABELS, source=SOURCE) -> Path:
    """Export a linear head that scores UD by `strength * feature0`: positive is right, negative wrong."""
    kernel = np.zeros((FEATURE_SIZE, 2), np.float32)
    kernel[0, 1] = strength
    head_state = {
        "params": {"logits": {"kernel": kernel, "bias": np.zeros(2, np.float32)}},
        "feature_mean": np.zeros(FEATURE_SIZE, np.float32),
        "feature_std": np.ones(FEATURE_SIZE, np.float32),
    }
    manifest = {
        "labels": list(labels),
        "backbone": {"name": source["name"], "weights": "efficientnet_lite0_imagenet", "weights_sha256": source["weights_sha256"], "compute_dtype": source["compute_dtype"], "engine": source["engine"]},
        "preprocessing": {"preprocess_key": source["preprocess_key"]},
        "head": {"hidden_units": 0},
        "data": {"digest": digest, "assets": "/data", "counts": {}},
    }
    return export_model(workspace, model_id=model_id, head_state=head_state, manifest=manifest, metrics={}, history=[], rejected=[])


def test_first_model_becomes_champion(tmp_path):
    folder = make_model(tmp_path, "m1", 2.0)

    result = registry.register_model(tmp_path, folder, make_validation(0), lineage={"code_version": "c1"})

    assert result["status"] == "promoted"
    assert result["version"] == 1
    assert result["champion"] == "m1"
    assert result["metrics"]["accuracy"] == 1.0
    assert registry.champion_dir(tmp_path) == folder
    version = registry.get_version(tmp_path, "v1")
    assert version["lineage"]["data_digest"] == "d1"
    assert version["lineage"]["weights_sha256"] == SOURCE["weights_sha256"]
    assert version["lineage"]["code_version"] == "c1"
    assert version["lineage"]["parent"] is None


def test_worse_model_rejected_with_reason(tmp_path):
    validation = make_validation(0)
    registry.register_model(tmp_path, make_model(tmp_path, "m1", 2.0), validation)

    result = registry.register_model(tmp_path, make_model(tmp_path, "m2", -2.0), validation)

    assert result["status"] == "rejected"
    assert result["champion"] == "m1"
    assert result["metrics"]["accuracy"] == 0.0
    assert result["champion_metrics"]["accuracy"] == 1.0
    assert "worse than the champion" in result["reason"]
    assert registry.champion_dir(tmp_path).name == "m1"
    stored = registry.get_version(tmp_path, "m2")
    assert stored["decision"] == "rejected"
    assert stored["lineage"]["parent"] == "m1"


def test_equal_model_promoted(tmp_path):
    validation = make_validation(0)
    registry.register_model(tmp_path, make_model(tmp_path, "m1", 2.0), validation)

    result = registry.register_model(tmp_path, make_model(tmp_path, "m2", 3.0), validation)

    assert result["status"] == "promoted"
    assert result["previous_champion"] == "m1"
    assert registry.champion_dir(tmp_path).name == "m2"


def test_loss_rule_and_tolerance(tmp_path):
    validation = make_validation(0)
    registry.register_model(tmp_path, make_model(tmp_path, "m1", 3.0), validation)
    loss_rule = registry.PromotionRule("loss", 0.0)

    # Same accuracy, but a weaker scale gives a higher cross-entropy.
    rejected = registry.register_model(tmp_path, make_model(tmp_path, "m2", 1.0), validation, rule=loss_rule)
    tolerated = registry.register_model(tmp_path, make_model(tmp_path, "m3", 1.0), validation, rule=registry.PromotionRule("loss", 1.0))

    assert rejected["metrics"]["accuracy"] == rejected["champion_metrics"]["accuracy"]
    assert rejected["metrics"]["loss"] > rejected["champion_metrics"]["loss"]
    assert rejected["status"] == "rejected"
    assert tolerated["status"] == "promoted"


def test_force_and_never(tmp_path):
    validation = make_validation(0)
    registry.register_model(tmp_path, make_model(tmp_path, "m1", 2.0), validation)

    never = registry.register_model(tmp_path, make_model(tmp_path, "m2", 3.0), validation, promote="never")
    forced = registry.register_model(tmp_path, make_model(tmp_path, "m3", -2.0), validation, promote="force")

    assert never["status"] == "rejected"
    assert "promote='never'" in never["reason"]
    assert forced["status"] == "promoted"
    assert registry.champion_dir(tmp_path).name == "m3"


def test_same_model_registers_once(tmp_path):
    validation = make_validation(0)
    folder = make_model(tmp_path, "m1", 2.0)
    registry.register_model(tmp_path, folder, validation)

    again = registry.register_model(tmp_path, folder, validation)

    assert again["status"] == "unchanged"
    assert again["version"] == 1
    assert "cache hit" in again["reason"]
    assert len(registry.load_registry(tmp_path)["versions"]) == 1


def test_champion_reevaluated_on_new_data(tmp_path):
    old = make_validation(0, digest="d1")
    registry.register_model(tmp_path, make_model(tmp_path, "m1", 2.0, digest="d1"), old)
    # New data where the label is the opposite sign: the old champion is now always wrong.
    new = make_validation(1, digest="d2")
    new.label_ids = 1 - new.label_ids

    result = registry.register_model(tmp_path, make_model(tmp_path, "m2", -2.0, digest="d2"), new)

    assert result["champion_metrics"]["accuracy"] == 0.0
    assert result["metrics"]["accuracy"] == 1.0
    assert result["status"] == "promoted"
    assert "new validation split" in result["reason"]


def test_champion_with_other_labels_kept(tmp_path):
    make_model(tmp_path, "m1", 2.0, labels=["cracked", "intact"])
    registry.promote_version(tmp_path, "m1")

    result = registry.register_model(tmp_path, make_model(tmp_path, "m2", 2.0, digest="d2"), make_validation(1, digest="d2"))

    assert result["status"] == "rejected"
    assert "could not be evaluated" in result["reason"]
    assert registry.champion_dir(tmp_path).name == "m1"


def test_champion_dir_without_registry(tmp_path):
    make_model(tmp_path, "m1", 2.0)
    make_model(tmp_path, "m2", 2.0)

    assert not registry.registry_path(tmp_path).exists()
    assert registry.champion_dir(tmp_path) == newest_model(tmp_path)


def test_champion_dir_missing_folder(tmp_path):
    folder = make_model(tmp_path, "m1", 2.0)
    registry.register_model(tmp_path, folder, make_validation(0))

    shutil.rmtree(folder)

    with pytest.raises(ModelError, match="crackjax models promote"):
        registry.champion_dir(tmp_path)


def test_promote_by_version_and_resolve(tmp_path):
    validation = make_validation(0)
    registry.register_model(tmp_path, make_model(tmp_path, "m1", 2.0), validation)
    registry.register_model(tmp_path, make_model(tmp_path, "m2", -2.0), validation)

    registry.promote_version(tmp_path, "2", reason="field check")

    assert registry.champion_dir(tmp_path).name == "m2"
    assert registry.resolve_model(tmp_path, "v1").name == "m1"
    assert registry.resolve_model(tmp_path, "champion").name == "m2"
    assert registry.load_registry(tmp_path)["events"][-1]["reason"] == "field check"
    with pytest.raises(CrackjaxError, match="not found"):
        registry.promote_version(tmp_path, "7")


def test_promote_unregistered_folder(tmp_path):
    make_model(tmp_path, "m1", 2.0)

    version = registry.promote_version(tmp_path, "m1")

    assert version["version"] == 1
    assert registry.champion_dir(tmp_path).name == "m1"


def test_invalid_rule_and_mode(tmp_path):
    with pytest.raises(CrackjaxError, match="unknown"):
        registry.PromotionRule("f2")
    with pytest.raises(CrackjaxError, match="tolerance"):
        registry.PromotionRule("accuracy", -0.1)
    with pytest.raises(CrackjaxError, match="promote"):
        registry.register_model(tmp_path, make_model(tmp_path, "m1", 2.0), make_validation(0), promote="maybe")


def test_unreadable_registry(tmp_path):
    registry.registry_path(tmp_path).parent.mkdir(parents=True)
    registry.registry_path(tmp_path).write_text("{not json")

    with pytest.raises(registry.RegistryError, match="unreadable"):
        registry.load_registry(tmp_path)


def test_models_cli_list_and_promote(tmp_path, capsys):
    import argparse

    from crackjax import registry_commands

    validation = make_validation(0)
    registry.register_model(tmp_path, make_model(tmp_path, "m1", 2.0), validation)
    registry.register_model(tmp_path, make_model(tmp_path, "m2", -2.0), validation)
    make_model(tmp_path, "m3", 2.0)
    parser = argparse.ArgumentParser()
    registry_commands.add_models_commands(parser.add_subparsers(dest="command"))

    args = parser.parse_args(["models", "list", "--workspace", str(tmp_path)])
    assert args.func(args) == 0
    listing = capsys.readouterr().out
    args = parser.parse_args(["models", "promote", "2", "--workspace", str(tmp_path)])
    assert args.func(args) == 0
    promoted = capsys.readouterr().out

    lines = listing.splitlines()
    assert lines[1].split()[:3] == ["1", "m1", "champion"]
    assert lines[2].split()[:3] == ["2", "m2", "rejected"]
    assert lines[3].split()[:3] == ["-", "m3", "unregistered"]
    assert "version 2 rejected: worse than the champion" in listing
    assert "version 2 (m2) is now the champion" in promoted


# Two processes register their own models into one workspace at the same time. The lock
# must keep every version and number them uniquely. Because a model is promoted exactly
# when it is not worse than the champion, the final champion is a best model.
_WORKER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from test_registry import make_validation
    from crackjax import registry
    workspace = Path(sys.argv[1])
    start_at = float(sys.argv[2])
    while time.time() < start_at:
        time.sleep(0.005)
    for model_id in sys.argv[3:]:
        registry.register_model(workspace, workspace / "models" / model_id, make_validation(0))
    """
)


def test_concurrent_registrations(tmp_path):
    import time

    # Head strengths from -3 to 3: accuracy 0 or 1 on the validation set, loss varies.
    strengths = {f"a{index}": value for index, value in enumerate((-1.0, 2.0, -3.0, 1.0, 0.5, -0.5))}
    strengths.update({f"b{index}": value for index, value in enumerate((3.0, -2.0, 1.5, -1.5, 0.25, 2.5))})
    for model_id, strength in strengths.items():
        make_model(tmp_path, model_id, strength)
    script = _WORKER.format(tests=str(Path(__file__).parent))
    start_at = time.time() + 5.0
    processes = [
        subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(start_at), *[key for key in strengths if key[0] == prefix]], cwd=REPO_ROOT)
        for prefix in ("a", "b")
    ]
    codes = [process.wait(timeout=120) for process in processes]

    stored = json.loads(registry.registry_path(tmp_path).read_text())
    numbers = sorted(version["version"] for version in stored["versions"])
    accuracies = {version["model_id"]: version["metrics"]["accuracy"] for version in stored["versions"]}
    assert codes == [0, 0]
    assert numbers == list(range(1, len(strengths) + 1))
    assert set(accuracies) == set(strengths)
    assert len(stored["events"]) == len(strengths)
    assert accuracies[stored["champion"]] == 1.0
    for version in stored["versions"][1:]:
        assert version["lineage"]["parent"] is not None


def test_predictor_path_matches_feature_path(trained_workspace):
    """A champion with another feature source is evaluated with its own backbone on the images; the metrics agree."""
    import glob

    workspace = trained_workspace["workspace"]
    model_dir = Path(trained_workspace["result"]["model_dir"])
    manifest = json.loads((model_dir / "manifest.json").read_text())
    dataset = glob.glob(str(workspace / "datasets" / "*" / manifest["preprocessing"]["preprocess_key"] / "dataset.parquet"))[0]
    preprocessed = {
        "dataset": dataset, "assets": manifest["data"]["assets"], "digest": manifest["data"]["digest"],
        "labels": manifest["labels"], "preprocess_key": manifest["preprocessing"]["preprocess_key"],
    }
    features = {"features": manifest["features"]["store"], "feature_size": manifest["backbone"]["feature_size"]}
    validation = registry.validation_set(preprocessed, features, manifest["backbone"])
    # Sixteen images keep the backbone pass short.
    validation.label_ids, validation.paths, validation.features = validation.label_ids[:16], validation.paths[:16], validation.features[:16]

    from_features = registry.evaluate_model(model_dir, validation)
    validation.feature_source = {**validation.feature_source, "preprocess_key": "another preprocessing"}
    from_images = registry.evaluate_model(model_dir, validation)

    assert from_images["count"] == 16
    assert from_images["accuracy"] == from_features["accuracy"]
    assert from_images["loss"] == pytest.approx(from_features["loss"], abs=1e-4)
