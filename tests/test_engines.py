"""Automatic engine choice: calibration on the real EfficientNet-Lite0 weights, its record, and the cases that keep XLA."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from crackjax import bottleneck, engines
from crackjax.backbones import file_sha256, resolve_backbone


@pytest.fixture
def lite0(monkeypatch, tmp_path):
    """EfficientNet-Lite0 with its packaged weights, and an empty cache folder for calibration records."""
    resolved = resolve_backbone("efficientnet_lite0")
    monkeypatch.setenv("CRACKJAX_CACHE", str(tmp_path / "cache"))
    path = resolved.weights_path
    return {"backbone_name": "efficientnet_lite0", "weights_name": resolved.weights.name, "weights_path": path, "weights_sha256": file_sha256(path)}


@pytest.fixture
def fresh_backbones():
    """Drop the loaded backbones of this process before and after the test, so it builds its own."""
    bottleneck._load_backbone_cached.cache_clear()
    yield
    bottleneck._load_backbone_cached.cache_clear()


def _records(tmp_path) -> list:
    return sorted((tmp_path / "cache" / "engines").glob("*.json"))


def test_auto_calibration_record_reused(lite0, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="crackjax")
    choice = engines.choose_engine("auto", **lite0)

    [record_path] = _records(tmp_path)
    record = json.loads(record_path.read_text())
    assert record == choice.calibration
    assert record["backbone"] == "efficientnet_lite0"
    assert record["probe_batch"] == engines.PROBE_BATCH
    assert record["xla_images_per_second"] > 0
    assert record["onnxruntime_images_per_second"] > 0
    assert 0 <= record["max_abs_diff"] <= engines.PARITY_TOLERANCE
    faster = max(engines.ENGINES, key=lambda name: record[f"{name}_images_per_second"])
    assert choice.engine == faster
    assert choice.reason.endswith(f"; record {record_path}")

    def no_second_calibration(*args):
        raise AssertionError("calibrated again although a record exists")

    monkeypatch.setattr(engines, "calibrate", no_second_calibration)
    again = engines.choose_engine("auto", **lite0)
    assert again.engine == choice.engine
    assert again.calibration == record
    assert again.reason.startswith(f"measured {record['measured_at']}: ")
    assert f"max abs difference {record['max_abs_diff']:.1e}" in again.reason
    assert again.reason.endswith(f"; record {record_path}")


def test_auto_keeps_xla_when_features_differ(lite0, tmp_path, monkeypatch, caplog):
    # The real difference between the engines (about 1e-5) exceeds a zero tolerance.
    monkeypatch.setattr(engines, "PARITY_TOLERANCE", 0.0)
    choice = engines.choose_engine("auto", **lite0)

    assert choice.engine == "xla"
    assert choice.calibration["max_abs_diff"] > 0
    assert "features differ by more than" in choice.calibration["error"]
    assert "using xla" in caplog.text
    assert json.loads(_records(tmp_path)[0].read_text())["engine"] == "xla"


def test_auto_keeps_xla_when_onnxruntime_fails(lite0, tmp_path, monkeypatch, fresh_backbones, caplog):
    import crackjax.onnx_engine

    def broken_build(*args):
        raise RuntimeError("graph builder broke")

    monkeypatch.setattr(crackjax.onnx_engine, "build_onnx_model", broken_build)
    choice = engines.choose_engine("auto", **lite0)

    assert choice.engine == "xla"
    assert choice.calibration["error"] == "onnxruntime failed: RuntimeError: graph builder broke"
    assert choice.calibration["xla_images_per_second"] > 0
    assert "the onnxruntime engine failed on efficientnet_lite0" in caplog.text


def test_unreadable_record_is_measured_again(lite0, tmp_path, caplog):
    path = engines.calibration_path(lite0["backbone_name"], lite0["weights_sha256"])
    path.parent.mkdir(parents=True)
    path.write_text('{"engine": "onnx', encoding="utf-8")

    choice = engines.choose_engine("auto", **lite0)

    assert "is unreadable" in caplog.text
    assert json.loads(path.read_text()) == choice.calibration


def test_wrong_typed_record_remeasured(lite0, caplog):
    path = engines.calibration_path(lite0["backbone_name"], lite0["weights_sha256"])
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"backbone": "efficientnet_lite0", "engine": "onnxruntime", "xla_images_per_second": "n/a"}), encoding="utf-8")

    choice = engines.choose_engine("auto", **lite0)

    assert "has values of the wrong type; measuring again" in caplog.text
    assert isinstance(choice.calibration["xla_images_per_second"], float)
    assert json.loads(path.read_text()) == choice.calibration


def test_non_text_error_record_remeasured(lite0, caplog):
    path = engines.calibration_path(lite0["backbone_name"], lite0["weights_sha256"])
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"backbone": "efficientnet_lite0", "engine": "xla", "xla_images_per_second": 10.0, "error": 1}), encoding="utf-8")

    choice = engines.choose_engine("auto", **lite0)

    assert "has values of the wrong type; measuring again" in caplog.text
    assert json.loads(path.read_text()) == choice.calibration


def test_unwritable_record_folder_logs_warning(lite0, tmp_path, caplog):
    # A file where the records folder belongs fails like a read-only cache, also for root.
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "engines").write_text("not a folder")

    choice = engines.choose_engine("auto", **lite0)

    assert choice.engine in engines.ENGINES
    assert "cannot write the calibration record" in caplog.text
    assert "; record" not in choice.reason


def test_choices_made_without_calibration(lite0, tmp_path, monkeypatch):
    assert engines.choose_engine("xla", **lite0).engine == "xla"
    assert engines.choose_engine("onnxruntime", **lite0).engine == "onnxruntime"
    bf16 = engines.choose_engine("auto", **lite0, compute_dtype="bfloat16")
    assert (bf16.engine, bf16.reason) == ("xla", "the onnxruntime engine runs float32 only, not bfloat16")
    other = engines.choose_engine("auto", **{**lite0, "backbone_name": "vit_b16"})
    assert (other.engine, other.reason) == ("xla", "the onnxruntime engine has no graph of vit_b16")
    with pytest.raises(ValueError, match="auto, xla, onnxruntime"):
        engines.choose_engine("tensorrt", **lite0)

    monkeypatch.setattr(engines, "find_spec", lambda name: None if name == "onnxruntime" else object())
    missing = engines.choose_engine("auto", **lite0)
    assert (missing.engine, missing.reason) == ("xla", "onnxruntime is not installed")
    assert _records(tmp_path) == []

    from crackjax.errors import CrackjaxError

    with pytest.raises(CrackjaxError, match="needs the onnx and onnxruntime packages, which are not installed"):
        engines.check_engine_options("onnxruntime", "float32")
    engines.check_engine_options("auto", "float32")


def test_record_key_covers_weights_and_backbone(lite0):
    path = engines.calibration_path("efficientnet_lite0", lite0["weights_sha256"])
    assert path == engines.calibration_path("efficientnet_lite0", lite0["weights_sha256"])
    assert path != engines.calibration_path("efficientnet_lite0", "0" * 64)
    assert path != engines.calibration_path("efficientnet_lite1", lite0["weights_sha256"])


def test_probe_images_are_deterministic_and_varied():
    first = engines.probe_images(224)
    assert first.shape == (engines.PROBE_BATCH, 224, 224, 3)
    assert first.dtype == np.uint8
    np.testing.assert_array_equal(first, engines.probe_images(224))
    assert first.std() > 20
    assert not np.array_equal(first[0], first[1])


def test_load_backbone_auto_and_memoised(lite0):
    arguments = (lite0["backbone_name"], lite0["weights_name"], lite0["weights_path"])
    loaded = bottleneck.load_backbone(*arguments, engine="auto")
    assert loaded.engine == engines.choose_engine("auto", **lite0).engine
    assert bottleneck.load_backbone(*arguments, engine=loaded.engine) is loaded


def test_registered_backbones_have_onnx_graphs():
    from crackjax.backbones import backbones

    for name in backbones():
        assert engines.onnx_supported(name), f"build_onnx_model has no graph for {name}"


@pytest.fixture
def deck_photos(sdnet_images):
    """Four real deck photos at 224 px and their file names as keys."""
    from crackjax.images import load_image

    paths = sdnet_images["CD"][:2] + sdnet_images["UD"][:2]
    return np.stack([load_image(path, 224) for path in paths]), [path.name for path in paths]


def test_bfloat16_check_passes_and_records(lite0, deck_photos, tmp_path, monkeypatch):
    monkeypatch.setattr(engines, "BFLOAT16_MIN_COSINE", 0.0)
    images, keys = deck_photos
    record = engines.check_bfloat16(**lite0, images=images, image_keys=keys)

    [path] = (tmp_path / "cache" / "engines").glob("*-bfloat16.json")
    assert json.loads(path.read_text()) == record
    assert record["images"] == 4
    assert record["max_abs_diff"] > 0
    assert 0.0 < record["min_cosine"] <= 1.0


def test_bfloat16_check_rejects_lite0_on_photos(lite0, deck_photos, monkeypatch):
    """bfloat16 casts batch norm statistics too, and on real deck photos EfficientNet-Lite0 falls below the bound."""
    from crackjax.errors import CrackjaxError

    images, keys = deck_photos
    with pytest.raises(CrackjaxError, match="train with --compute-dtype float32") as raised:
        engines.check_bfloat16(**lite0, images=images, image_keys=keys)
    assert "bfloat16 features of efficientnet_lite0 reach a min cosine similarity of only" in str(raised.value)
    assert "on 4 photos of this dataset" in str(raised.value)

    def no_second_measurement(*args, **kwargs):
        raise AssertionError("measured again although a record exists")

    monkeypatch.setattr(bottleneck, "load_backbone", no_second_measurement)
    with pytest.raises(CrackjaxError, match="below the 0.999 required"):
        engines.check_bfloat16(**lite0, images=images, image_keys=keys)


@pytest.mark.parametrize(
    ("engine", "compute_dtype", "message"),
    [
        ("tensorrt", "float32", "engine 'tensorrt' is invalid; use one of auto, xla, onnxruntime"),
        ("auto", "float16", "compute dtype 'float16' is invalid; use one of float32, bfloat16"),
        ("onnxruntime", "bfloat16", "the onnxruntime engine runs float32 only, not bfloat16; use --engine xla (or auto)"),
    ],
)
def test_engine_options_rejected(engine, compute_dtype, message):
    from crackjax.errors import CrackjaxError

    with pytest.raises(CrackjaxError) as raised:
        engines.check_engine_options(engine, compute_dtype)
    assert message in str(raised.value)


def test_engine_options_accepted():
    for engine in engines.ENGINE_CHOICES:
        engines.check_engine_options(engine, "float32")
    engines.check_engine_options("auto", "bfloat16")
    engines.check_engine_options("xla", "bfloat16")


def test_record_key_covers_thread_setting(lite0, monkeypatch):
    monkeypatch.delenv("CRACKJAX_ORT_THREADS", raising=False)
    every_cpu = engines.calibration_path("efficientnet_lite0", lite0["weights_sha256"])
    monkeypatch.setenv("CRACKJAX_ORT_THREADS", "1")
    assert engines.calibration_path("efficientnet_lite0", lite0["weights_sha256"]) != every_cpu
