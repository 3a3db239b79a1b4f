"""Prediction helpers that run without the training code."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from crackjax.head import predict_proba
from crackjax.predict import head_probabilities


@pytest.mark.parametrize("hidden_units", [0, 8])
def test_numpy_head_matches_flax_head(hidden_units):
    rng = np.random.default_rng(hidden_units)
    params = {"logits": {"kernel": rng.normal(size=(hidden_units or 5, 3)).astype(np.float32), "bias": rng.normal(size=3).astype(np.float32)}}
    if hidden_units:
        params["hidden"] = {"kernel": rng.normal(size=(5, hidden_units)).astype(np.float32), "bias": rng.normal(size=hidden_units).astype(np.float32)}
    features = rng.normal(size=(6, 5)).astype(np.float32)
    mean = rng.normal(size=5).astype(np.float32)
    std = rng.uniform(0.5, 2.0, size=5).astype(np.float32)

    expected = predict_proba(params, mean, std, features, 3, hidden_units)
    actual = head_probabilities(params, mean, std, features)

    np.testing.assert_allclose(actual, expected, atol=1e-6)
    np.testing.assert_allclose(actual.sum(axis=1), 1.0, atol=1e-6)


def test_engine_falls_back_without_onnxruntime(monkeypatch, caplog):
    import crackjax.predict
    from crackjax.errors import ModelError

    assert crackjax.predict._runnable_engine(None, "onnxruntime") == "onnxruntime"
    # A None entry in sys.modules makes `import onnxruntime` raise ImportError, as a missing or broken package does.
    monkeypatch.setitem(sys.modules, "onnxruntime", None)

    assert crackjax.predict._runnable_engine(None, "onnxruntime") == "xla"
    assert "onnxruntime cannot be imported" in caplog.text
    assert "running the backbone with xla" in caplog.text
    assert crackjax.predict._runnable_engine(None, "xla") == "xla"
    assert crackjax.predict._runnable_engine("xla", "onnxruntime") == "xla"
    with pytest.raises(ModelError, match="install them with .* or pass --engine xla"):
        crackjax.predict._runnable_engine("onnxruntime", "xla")
