"""Bottleneck: a frozen backbone turns decoded images into feature vectors, cached by content.

The forward pass is jitted once for a fixed batch shape; the last batch is padded, so
one compilation serves every batch. Pixels stream from the Parquet pixel store and
features go to a Parquet feature store in parts of `part_size` rows, so memory is
bounded by a batch and a part, and a killed run resumes from the parts it wrote.
Feature rows are keyed by image sha256 inside a store whose key covers the backbone,
the sha256 of its weights file, the preprocessing, the compute dtype and the engine.

Two engines run the forward pass: "xla" (the jitted Flax module) and "onnxruntime"
(`crackjax.onnx_engine`, an ONNX graph built from the same variables); "auto" picks
one by measuring both (`crackjax.engines`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa

from crackjax.backbones.base import Backbone, Params, scale_pixels
from crackjax.engines import ENGINE_CHOICES, ENGINES, choose_engine
from crackjax.store import CorruptPartError, PartStore, chunked, digest_of

log = logging.getLogger(__name__)

FEATURES_VERSION = 1


@dataclasses.dataclass(frozen=True)
class LoadedBackbone:
    """A backbone with its weights loaded: `forward` maps `(batch, size, size, 3) uint8` to `(batch, features) float32`."""

    backbone: Backbone
    variables: Params
    weights_name: str
    weights_path: str
    weights_sha256: str
    compute_dtype: str
    engine: str = "xla"

    @functools.cached_property
    def forward(self):
        module = self.backbone.build()
        scaling = self.backbone.pixel_scaling
        dtype = jnp.dtype(self.compute_dtype)

        @jax.jit
        def forward(variables: Params, images: jnp.ndarray) -> jnp.ndarray:
            x = scale_pixels(images, scaling)
            if dtype != jnp.float32:
                x = x.astype(dtype)
                variables = jax.tree_util.tree_map(lambda leaf: leaf.astype(dtype) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf, variables)
            return module.apply(variables, x).astype(jnp.float32)

        return forward

    def features(self, images: np.ndarray) -> jax.Array:
        """Dispatch the forward pass on `(batch, size, size, 3) uint8` images; the result is computed asynchronously."""
        return self.forward(self.variables, images)


def feature_store(
    workspace: str | Path,
    backbone_name: str,
    weights_name: str,
    weights_sha256: str,
    preprocess_key: str,
    compute_dtype: str,
    feature_size: int,
    engine: str = "xla",
) -> PartStore:
    """Open the feature store of `workspace` for this backbone, weights file, preprocessing, dtype and engine.

    The "xla" engine leaves `engine` out of the store description, so stores written
    before engines existed keep their key. Any other engine gets a store of its own.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    description = {
        "kind": "features",
        "backbone": backbone_name,
        "weights": weights_name,
        "weights_sha256": weights_sha256,
        "preprocess_key": preprocess_key,
        "compute_dtype": compute_dtype,
        "feature_size": feature_size,
        "version": FEATURES_VERSION,
    }
    if engine != "xla":
        description["engine"] = engine
    key = digest_of(description)[:16]
    return PartStore(Path(workspace) / "features" / f"{backbone_name}-{key}", description)


def feature_schema(feature_size: int) -> pa.Schema:
    """Return the feature store schema: `sha256` and a `(feature_size,) float32` vector."""
    return pa.schema([("sha256", pa.string()), ("features", pa.list_(pa.float32(), feature_size))])


def plan_bottleneck(keys: list[str], store: PartStore, shard_size: int = 512) -> tuple[list[list[str]], int]:
    """Return the shards of image keys still missing from `store`, and how many are cached."""
    present = store.keys()
    unique = sorted(set(keys))
    missing = [key for key in unique if key not in present]
    return list(chunked(missing, shard_size)), len(unique) - len(missing)


def pixel_batches(pixels: PartStore, keys: list[str], input_size: int, batch_size: int) -> Iterator[tuple[list[str], np.ndarray]]:
    """Yield `(keys, (batch_size, size, size, 3) uint8)` batches, the last one padded with zeros."""
    shape = (input_size, input_size, 3)
    buffer = np.zeros((batch_size, *shape), np.uint8)
    batch_keys: list[str] = []
    for record_batch in pixels.iter_batches(set(keys)):
        for key, data in zip(record_batch.column("sha256").to_pylist(), record_batch.column("pixels").to_pylist()):
            buffer[len(batch_keys)] = np.frombuffer(data, np.uint8).reshape(shape)
            batch_keys.append(key)
            if len(batch_keys) == batch_size:
                yield batch_keys, buffer.copy()
                batch_keys = []
    if batch_keys:
        buffer[len(batch_keys):] = 0
        yield batch_keys, buffer.copy()


def compute_shard(
    loaded: LoadedBackbone,
    pixels: PartStore,
    features: PartStore,
    keys: list[str],
    *,
    batch_size: int = 32,
    part_size: int = 256,
) -> int:
    """Compute features for `keys` and append them to `features` in parts; return how many were computed.

    The next batch is read while the current one computes, since JAX dispatches
    asynchronously. Keys missing from the pixel store are skipped with a warning.
    """
    size = loaded.backbone.input_size
    schema = feature_schema(loaded.backbone.feature_size)
    part_keys: list[str] = []
    part_rows: list[np.ndarray] = []
    computed = 0
    pending = None

    def collect(batch_keys: list[str], result: jax.Array) -> None:
        values = np.asarray(result)[: len(batch_keys)]
        part_keys.extend(batch_keys)
        part_rows.append(values)

    def flush() -> None:
        nonlocal part_keys, part_rows
        if not part_keys:
            return
        matrix = np.concatenate(part_rows).astype(np.float32)
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])
        features.write_part(pa.Table.from_arrays([pa.array(part_keys, pa.string()), vectors], schema=schema))
        part_keys, part_rows = [], []

    for batch_keys, images in pixel_batches(pixels, keys, size, batch_size):
        result = loaded.features(images)
        if pending is not None:
            collect(*pending)
            if len(part_keys) >= part_size:
                flush()
        pending = (batch_keys, result)
        computed += len(batch_keys)
    if pending is not None:
        collect(*pending)
    flush()

    if computed < len(set(keys)):
        log.warning("bottleneck: %d of %d images had no decoded pixels and were skipped", len(set(keys)) - computed, len(set(keys)))
    return computed


def compute_features(
    loaded: LoadedBackbone,
    pixels: PartStore,
    features: PartStore,
    keys: list[str],
    *,
    batch_size: int = 32,
    shard_size: int = 512,
) -> tuple[int, int, float]:
    """Compute features for every key missing from `features`; return `(cached, computed, seconds)`."""
    started = time.perf_counter()
    shards, cached = plan_bottleneck(keys, features, shard_size)
    computed = 0
    for shard in shards:
        computed += compute_shard(loaded, pixels, features, shard, batch_size=batch_size)
    seconds = time.perf_counter() - started
    log.info("bottleneck: %s", describe_counts(cached + computed, cached, computed, seconds))
    return cached, computed, seconds


def describe_counts(total: int, cached: int, computed: int, seconds: float) -> str:
    """Format the bottleneck log line: `280 images, 0 cached, 280 computed in 21.4 s (13.1 img/s)`."""
    if not computed:
        return f"{total} images, {cached} cached, 0 computed"
    rate = computed / seconds if seconds > 0 else 0.0
    return f"{total} images, {cached} cached, {computed} computed in {seconds:.1f} s ({rate:.1f} img/s)"


def feature_fidelity(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Compare two `(n, features)` feature matrices row by row.

    Returns `max_abs_diff` over all values and the `min_cosine` and `mean_cosine`
    similarity of matching rows. A row of zeros in both counts as cosine 1, and a row
    of zeros in only one as cosine 0. A row with a NaN or infinite value counts as
    cosine -1, and makes `max_abs_diff` infinite.
    """
    reference = np.asarray(reference, np.float64)
    candidate = np.asarray(candidate, np.float64)
    if reference.shape != candidate.shape:
        raise ValueError(f"feature shapes differ: {reference.shape} and {candidate.shape}")
    finite = np.all(np.isfinite(reference), axis=1) & np.all(np.isfinite(candidate), axis=1)
    reference = np.where(finite[:, None], reference, 0.0)
    candidate = np.where(finite[:, None], candidate, 0.0)
    dot = np.sum(reference * candidate, axis=1)
    reference_norm = np.linalg.norm(reference, axis=1)
    candidate_norm = np.linalg.norm(candidate, axis=1)
    norms = reference_norm * candidate_norm
    both_zero = (reference_norm == 0) & (candidate_norm == 0)
    cosine = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), np.where(both_zero, 1.0, 0.0))
    cosine = np.where(finite, cosine, -1.0)
    if not finite.all():
        return {"max_abs_diff": float("inf"), "min_cosine": float(np.min(cosine)), "mean_cosine": float(np.mean(cosine))}
    return {
        "max_abs_diff": float(np.max(np.abs(reference - candidate))) if reference.size else 0.0,
        "min_cosine": float(np.min(cosine)) if len(cosine) else 1.0,
        "mean_cosine": float(np.mean(cosine)) if len(cosine) else 1.0,
    }


def load_feature_matrix(store: PartStore, keys: list[str], feature_size: int) -> np.ndarray:
    """Return the `(len(keys), feature_size) float32` features of `keys`, in their order.

    Raises CorruptPartError (after moving the part aside) when a part fails its
    checksums, and KeyError naming a key that has no features.
    """
    rows_of: dict[str, list[int]] = {}
    for index, key in enumerate(keys):
        rows_of.setdefault(key, []).append(index)
    matrix = np.zeros((len(keys), feature_size), np.float32)
    found: set[str] = set()
    for batch in store.iter_batches(set(rows_of)):
        values = batch.column("features").flatten().to_numpy(zero_copy_only=False).reshape(-1, feature_size)
        for key, vector in zip(batch.column("sha256").to_pylist(), values):
            matrix[rows_of[key]] = vector
            found.add(key)
    missing = set(rows_of) - found
    if missing:
        raise KeyError(f"no features for {len(missing)} images, such as {min(missing)}; run the bottleneck stage again")
    return matrix


@functools.lru_cache(maxsize=4)
def _converted_path(name: str, weights_sha256: str) -> Path:
    """Return where the Flax variables converted from a weights file are cached.

    The key covers the weights file's sha256 and the source of the backbone's family
    module and of `crackjax.weights` (the readers), so a new file or a changed loader
    converts again.
    """
    from crackjax.backbones import get_backbone
    from crackjax.versioning import code_digest
    from crackjax.weights.cache import cache_dir

    build = get_backbone(name).build
    module = getattr(build, "func", build).__module__
    loader = code_digest(module, "crackjax.weights")
    key = digest_of({"weights_sha256": weights_sha256, "loader": loader, "version": FEATURES_VERSION})[:24]
    return cache_dir() / "converted" / f"{name}-{key}.npz"


def _read_converted(name: str, weights_sha256: str) -> Params | None:
    """Return the cached converted variables of a weights file, or None when absent or unreadable."""
    path = _converted_path(name, weights_sha256)
    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            variables: dict = {}
            for flat_name in data.files:
                node = variables
                *parents, leaf = flat_name.split("/")
                for part in parents:
                    node = node.setdefault(part, {})
                node[leaf] = data[flat_name]
        return variables
    except (OSError, ValueError, KeyError) as error:
        log.warning("backbone: cached conversion %s is unreadable (%s); converting the weights file again", path, error)
        return None


def _write_converted(name: str, weights_sha256: str, variables: Params) -> None:
    """Cache converted variables as one `.npz` so later processes skip the conversion; failures only log."""
    from crackjax.atomic import atomic_path

    path = _converted_path(name, weights_sha256)
    flat = {"/".join(str(getattr(part, "key", part)) for part in key_path): np.asarray(leaf) for key_path, leaf in jax.tree_util.tree_leaves_with_path(variables)}
    try:
        with atomic_path(path) as temp:
            with open(temp, "wb") as handle:
                np.savez(handle, **flat)
    except OSError as error:
        log.info("backbone: cannot cache the converted weights at %s (%s); the next process converts them again", path, error)


@functools.lru_cache(maxsize=4)
def _load_backbone_cached(name: str, weights_name: str, weights_path: str, weights_sha256: str, compute_dtype: str, engine: str):
    from crackjax.backbones import get_backbone

    backbone = get_backbone(name)
    started = time.perf_counter()
    variables = _read_converted(name, weights_sha256)
    if variables is None:
        variables = backbone.load_params(Path(weights_path))
        _write_converted(name, weights_sha256, variables)
    log.info("backbone: loaded %s weights %s in %.1f s", name, weights_path, time.perf_counter() - started)
    if engine == "onnxruntime":
        from crackjax.onnx_engine import OnnxBackbone

        return OnnxBackbone(backbone, variables, weights_name, weights_path, weights_sha256, compute_dtype)
    return LoadedBackbone(backbone, variables, weights_name, weights_path, weights_sha256, compute_dtype)


def load_backbone(name: str, weights_name: str, weights_path: str | Path, *, compute_dtype: str = "float32", engine: str = "xla"):
    """Load backbone `name` with the weights file at `weights_path`, memoised per process.

    `engine` is "xla" (returns a `LoadedBackbone`), "onnxruntime" (returns an
    `OnnxBackbone`) or "auto" (either, as `crackjax.engines.choose_engine` decides);
    both have `features(images)` and `engine`. `compute_dtype` is `float32` or
    `bfloat16`, and the onnxruntime engine runs float32 only. Features are returned
    as float32 either way.
    """
    from crackjax.backbones import file_sha256
    from crackjax.runtime import configure_jax

    if engine not in ENGINE_CHOICES:
        raise ValueError(f"engine must be one of {', '.join(ENGINE_CHOICES)}, not {engine!r}")
    if compute_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"compute dtype must be float32 or bfloat16, not {compute_dtype!r}")
    if engine == "onnxruntime" and compute_dtype != "float32":
        raise ValueError(f"the onnxruntime engine runs float32 only, not {compute_dtype!r}; use engine 'xla' for bfloat16")
    configure_jax()
    sha256 = file_sha256(weights_path)
    if engine == "auto":
        engine = choose_engine(engine, name, weights_name, weights_path, sha256, compute_dtype).engine
    return _load_backbone_cached(name, weights_name, str(weights_path), sha256, compute_dtype, engine)
