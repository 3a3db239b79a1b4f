"""Head training: learning, early stopping, schedules and class weights."""

from __future__ import annotations

import numpy as np
import pytest

from crackjax.head import HeadConfig, class_weights, make_schedule, standardization, train_head


def _blobs(seed: int, count: int, features: int = 32, shift: float = 1.5):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, count)
    points = rng.normal(size=(count, features)).astype(np.float32)
    points[:, 0] += shift * (2 * labels - 1)
    return points, labels


def test_linear_head_learns_separable_data():
    x_train, y_train = _blobs(0, 300)
    x_validation, y_validation = _blobs(1, 200)

    trained = train_head(x_train, y_train, x_validation, y_validation, 2, HeadConfig(epochs=40))

    accuracy = (trained.predict_proba(x_validation).argmax(1) == y_validation).mean()
    assert accuracy > 0.85
    assert len(trained.history) == 40
    assert trained.history[-1]["train_loss"] < trained.history[0]["train_loss"]


def test_hidden_layer_head_learns_xor():
    rng = np.random.default_rng(2)
    points = rng.uniform(-1, 1, size=(600, 2)).astype(np.float32)
    labels = ((points[:, 0] > 0) ^ (points[:, 1] > 0)).astype(np.int32)

    config = HeadConfig(hidden_units=32, epochs=150, learning_rate=0.01, l2=0.0, standardize=True)
    trained = train_head(points[:400], labels[:400], points[400:], labels[400:], 2, config)

    accuracy = (trained.predict_proba(points[400:]).argmax(1) == labels[400:]).mean()
    assert accuracy > 0.9


def test_early_stopping_restores_best_epoch():
    x_train, y_train = _blobs(3, 60, features=200, shift=0.5)
    x_validation, y_validation = _blobs(4, 200, features=200, shift=0.5)

    config = HeadConfig(epochs=200, patience=5, monitor="val_loss", l2=0.0, learning_rate=0.01, standardize=True)
    trained = train_head(x_train, y_train, x_validation, y_validation, 2, config)

    losses = [record["val_loss"] for record in trained.history]
    assert len(trained.history) < 200
    assert trained.best_epoch == int(np.argmin(losses)) + 1
    assert len(trained.history) - trained.best_epoch >= 5
    probabilities = trained.predict_proba(x_validation)
    restored_loss = -np.mean(np.log(probabilities[np.arange(len(y_validation)), y_validation]))
    assert restored_loss == pytest.approx(min(losses), rel=1e-3)


def test_training_is_reproducible_for_a_seed():
    x_train, y_train = _blobs(5, 100)
    x_validation, y_validation = _blobs(6, 50)

    first = train_head(x_train, y_train, x_validation, y_validation, 2, HeadConfig(epochs=10, seed=3))
    again = train_head(x_train, y_train, x_validation, y_validation, 2, HeadConfig(epochs=10, seed=3))

    np.testing.assert_array_equal(first.params["logits"]["kernel"], again.params["logits"]["kernel"])


def test_balanced_class_weights():
    weights = class_weights(np.array([0, 0, 0, 1]), 2, "balanced")

    np.testing.assert_allclose(weights, [4 / 6, 4 / 2])
    np.testing.assert_array_equal(class_weights(np.array([0, 1]), 2, "none"), [1.0, 1.0])


@pytest.mark.parametrize("schedule", ["constant", "exponential", "cosine"])
def test_schedules_start_at_learning_rate(schedule):
    config = HeadConfig(schedule=schedule, learning_rate=0.1, epochs=10, decay_rate=0.5)
    rate = make_schedule(config, steps_per_epoch=4)

    assert float(rate(0)) == pytest.approx(0.1)
    if schedule == "constant":
        assert float(rate(39)) == pytest.approx(0.1)
    elif schedule == "exponential":
        assert float(rate(8)) == pytest.approx(0.025)
    else:
        assert float(rate(40)) == pytest.approx(0.0, abs=1e-6)


def test_standardization_floors_constant_features():
    features = np.array([[0.0, 1.0], [0.0, 3.0]], np.float32)

    mean, std = standardization(features)

    np.testing.assert_allclose(mean, [0.0, 2.0])
    assert std[0] == pytest.approx(0.05)  # 10% of the mean deviation (0.5)
    assert std[1] == pytest.approx(1.0)


def test_invalid_options_are_rejected():
    with pytest.raises(ValueError, match="schedule 'linear' is unknown"):
        HeadConfig(schedule="linear")
    with pytest.raises(ValueError, match="epochs must be at least 1"):
        HeadConfig(epochs=0)
