"""Cache keys of the crack-train stages: what keys a stage and what does not."""

from __future__ import annotations

from flows.caching import stage_cache_policy

BACKBONE = {
    "name": "resnet_v2_101",
    "weights": "resnet_v2_101",
    "weights_path": "/home/inspector/.cache/crackjax/weights/resnet101v2.h5",
    "weights_sha256": "ab" * 32,
    "engine": "onnxruntime",
    "fallback_reason": None,
}


def _export_key(backbone: dict) -> str:
    return stage_cache_policy("export").compute_key(None, {"workspace": "/w", "backbone": backbone, "trained": {"head": "h", "seconds": 1.5}}, {})


def test_weights_path_and_fallback_unkeyed():
    moved = {**BACKBONE, "weights_path": "/srv/cache/weights/resnet101v2.h5"}
    reworded = {**BACKBONE, "fallback_reason": "could not reach https://example.invalid: timed out"}

    assert _export_key(moved) == _export_key(BACKBONE)
    assert _export_key(reworded) == _export_key(BACKBONE)


def test_weights_content_and_engine_key():
    assert _export_key({**BACKBONE, "weights_sha256": "cd" * 32}) != _export_key(BACKBONE)
    assert _export_key({**BACKBONE, "engine": "xla"}) != _export_key(BACKBONE)
    assert _export_key({**BACKBONE, "name": "resnet_v2_50"}) != _export_key(BACKBONE)
