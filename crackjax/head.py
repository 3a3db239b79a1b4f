"""Head: a softmax classifier trained with optax on cached bottleneck features.

The head is linear by default, with one optional hidden layer. With `standardize`,
features are scaled by the training split's mean and standard deviation. Both are
stored with the head either way, as zeros and ones when it is off. One jitted call runs a whole epoch (shuffle, fixed-shape batches with
the last one padded and masked, and `lax.scan` over the batches), so 100 epochs on a
few hundred features take seconds.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from crackjax.head_config import CLASS_WEIGHTINGS, MONITORS, SCHEDULES, HeadConfig

log = logging.getLogger(__name__)

__all__ = ["CLASS_WEIGHTINGS", "MONITORS", "SCHEDULES", "Head", "HeadConfig", "TrainedHead", "class_weights", "make_schedule", "predict_proba", "standardization", "train_head"]

class Head(nn.Module):
    """Standardise `(batch, features)` inputs, then an optional ReLU hidden layer, then `(batch, classes)` logits."""

    num_classes: int
    hidden_units: int = 0
    dropout: float = 0.0

    @nn.compact
    def __call__(self, features: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
        x = features
        if self.hidden_units:
            x = nn.relu(nn.Dense(self.hidden_units, name="hidden")(x))
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes, name="logits")(x)


@dataclasses.dataclass
class TrainedHead:
    """A trained head: its parameters, the feature standardisation and the training history."""

    config: HeadConfig
    num_classes: int
    params: dict
    feature_mean: np.ndarray
    feature_std: np.ndarray
    history: list[dict]
    best_epoch: int
    seconds: float

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Return `(n, classes) float32` class probabilities for `(n, feature_size)` features."""
        return predict_proba(self.params, self.feature_mean, self.feature_std, features, self.num_classes, self.config.hidden_units)


def predict_proba(params, mean, std, features, num_classes: int, hidden_units: int) -> np.ndarray:
    """Return `(n, classes) float32` probabilities of the head `params` on `(n, feature_size)` features."""
    model = Head(num_classes, hidden_units)
    probabilities = _apply_softmax(model, params, jnp.asarray(mean), jnp.asarray(std), jnp.asarray(features, jnp.float32))
    return np.asarray(probabilities)


@jax.jit(static_argnums=0)
def _apply_softmax(model, params, mean, std, features):
    return jax.nn.softmax(model.apply({"params": params}, (features - mean) / std))


def standardization(features: np.ndarray, floor_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Return the per-feature mean and standard deviation used to standardise `(n, feature_size)` features.

    Standard deviations are floored at `floor_fraction` of their mean over features:
    post-ReLU backbone features are often constant on the training split, and dividing
    by a near-zero deviation would blow up the values of later images.
    """
    mean = features.mean(axis=0)
    std = features.std(axis=0)
    floor = max(float(std.mean()) * floor_fraction, 1e-6)
    return mean.astype(np.float32), np.maximum(std, floor).astype(np.float32)


def class_weights(labels: np.ndarray, num_classes: int, weighting: str) -> np.ndarray:
    """Return `(classes,) float32` loss weights: `n / (classes * count)` for `balanced`, ones for `none`."""
    if weighting == "none":
        return np.ones(num_classes, np.float32)
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
    return weights.astype(np.float32)


def make_schedule(config: HeadConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Return the optax learning-rate schedule over optimizer steps."""
    if config.schedule == "constant":
        return optax.constant_schedule(config.learning_rate)
    if config.schedule == "exponential":
        return optax.exponential_decay(config.learning_rate, transition_steps=steps_per_epoch, decay_rate=config.decay_rate)
    return optax.cosine_decay_schedule(config.learning_rate, decay_steps=max(1, config.epochs * steps_per_epoch))


def train_head(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    validation_features: np.ndarray,
    validation_labels: np.ndarray,
    num_classes: int,
    config: HeadConfig = HeadConfig(),
    *,
    on_epoch: Callable[[dict], None] | None = None,
) -> TrainedHead:
    """Train a head on `(n, feature_size) float32` features and `(n,) int` label ids.

    Logs one line per epoch and calls `on_epoch(record)` with the same figures.
    """
    started = time.perf_counter()
    train_features = np.asarray(train_features, np.float32)
    validation_features = np.asarray(validation_features, np.float32)
    train_labels = np.asarray(train_labels, np.int32)
    validation_labels = np.asarray(validation_labels, np.int32)

    if config.standardize:
        mean, std = standardization(train_features)
    else:
        mean = np.zeros(train_features.shape[1], np.float32)
        std = np.ones(train_features.shape[1], np.float32)
    x_train = jnp.asarray((train_features - mean) / std)
    x_validation = jnp.asarray((validation_features - mean) / std)
    y_train = jnp.asarray(train_labels)
    y_validation = jnp.asarray(validation_labels)
    weights = jnp.asarray(class_weights(train_labels, num_classes, config.class_weighting))

    batch_size = min(config.batch_size, len(train_labels))
    steps_per_epoch = math.ceil(len(train_labels) / batch_size)
    schedule = make_schedule(config, steps_per_epoch)
    optimizer = optax.adamw(schedule, weight_decay=config.weight_decay)
    model = Head(num_classes, config.hidden_units, config.dropout)

    key = jax.random.PRNGKey(config.seed)
    key, init_key = jax.random.split(key)
    params = model.init(init_key, x_train[:1])["params"]
    opt_state = optimizer.init(params)
    train_epoch = _make_train_epoch(model, optimizer, batch_size, steps_per_epoch, config.label_smoothing, config.l2)
    evaluate = _make_evaluate(model)

    history: list[dict] = []
    best = {"epoch": 0, "params": params, "value": math.inf}
    waited = 0
    for epoch in range(1, config.epochs + 1):
        key, epoch_key = jax.random.split(key)
        params, opt_state, train_loss, train_accuracy = train_epoch(params, opt_state, x_train, y_train, weights, epoch_key)
        validation_loss, validation_accuracy = evaluate(params, x_validation, y_validation)
        record = {
            "epoch": epoch,
            "train_loss": float(train_loss),
            "train_accuracy": float(train_accuracy),
            "val_loss": float(validation_loss),
            "val_accuracy": float(validation_accuracy),
            "learning_rate": float(schedule(epoch * steps_per_epoch - 1)),
        }
        history.append(record)
        log.info(
            "epoch %d/%d: train loss %.4f accuracy %.4f, validation loss %.4f accuracy %.4f, learning rate %.2e",
            epoch, config.epochs, record["train_loss"], record["train_accuracy"], record["val_loss"], record["val_accuracy"], record["learning_rate"],
        )
        if on_epoch is not None:
            on_epoch(record)

        value = record[config.monitor] if config.monitor == "val_loss" else -record[config.monitor]
        if value < best["value"] - config.min_delta:
            best = {"epoch": epoch, "params": params, "value": value}
            waited = 0
        else:
            waited += 1
            if config.patience and waited >= config.patience:
                log.info("early stopping after epoch %d: %s did not improve for %d epochs; restoring epoch %d", epoch, config.monitor, config.patience, best["epoch"])
                break

    params = best["params"] if config.patience else params
    best_epoch = best["epoch"] if config.patience else len(history)
    return TrainedHead(
        config=config,
        num_classes=num_classes,
        params=jax.tree_util.tree_map(np.asarray, params),
        feature_mean=mean,
        feature_std=std,
        history=history,
        best_epoch=best_epoch,
        seconds=time.perf_counter() - started,
    )


def _make_train_epoch(model: Head, optimizer, batch_size: int, steps: int, label_smoothing: float, l2: float):
    """Build the jitted epoch: shuffle, pad to `steps * batch_size`, and scan the optimizer over batches."""

    def loss_fn(params, x, y, mask, class_weights, dropout_key):
        logits = model.apply({"params": params}, x, train=True, rngs={"dropout": dropout_key})
        targets = optax.smooth_labels(jax.nn.one_hot(y, logits.shape[-1]), label_smoothing) if label_smoothing else jax.nn.one_hot(y, logits.shape[-1])
        losses = optax.softmax_cross_entropy(logits, targets)
        sample_weights = mask * class_weights[y]
        loss = jnp.sum(losses * sample_weights) / jnp.maximum(jnp.sum(sample_weights), 1e-12)
        if l2:
            kernels = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params) if path[-1].key == "kernel"]
            loss = loss + 0.5 * l2 * sum(jnp.sum(kernel**2) for kernel in kernels)
        correct = jnp.sum((jnp.argmax(logits, -1) == y) * mask)
        return loss, (jnp.sum(losses * mask), correct)

    @jax.jit
    def train_epoch(params, opt_state, x, y, class_weights, key):
        count = x.shape[0]
        shuffle_key, dropout_key = jax.random.split(key)
        order = jax.random.permutation(shuffle_key, count)
        padded = jnp.concatenate([order, order[: steps * batch_size - count]])
        mask = (jnp.arange(steps * batch_size) < count).astype(jnp.float32)
        batches = (padded.reshape(steps, batch_size), mask.reshape(steps, batch_size), jax.random.split(dropout_key, steps))

        def step(carry, batch):
            params, opt_state = carry
            indices, batch_mask, step_key = batch
            grads, (loss_sum, correct) = jax.grad(loss_fn, has_aux=True)(params, x[indices], y[indices], batch_mask, class_weights, step_key)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), (loss_sum, correct)

        (params, opt_state), (loss_sums, corrects) = jax.lax.scan(step, (params, opt_state), batches)
        return params, opt_state, jnp.sum(loss_sums) / count, jnp.sum(corrects) / count

    return train_epoch


def _make_evaluate(model: Head):
    @jax.jit
    def evaluate(params, x, y):
        logits = model.apply({"params": params}, x)
        loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
        accuracy = jnp.mean(jnp.argmax(logits, -1) == y)
        return loss, accuracy

    return evaluate
