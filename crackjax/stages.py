"""Pipeline stages as plain functions over workspace paths, for the Prefect flow and for direct use.

Each stage reads what earlier stages wrote in the workspace, writes its own outputs
atomically, and returns a small JSON-serialisable dict describing them. The dicts are
what the Prefect tasks return and cache.

Workspace layout:
    datasets/<digest>/dataset.parquet, rejected.csv     ingest
    datasets/<digest>/<preprocess key>/dataset.parquet  preprocess (usable rows)
    pixels/<size>px-<key>/part-*.parquet                 decoded pixels by image sha256
    features/<backbone>-<key>/part-*.parquet             bottleneck features by image sha256
    heads/<key>/head.npz, history.json, evaluation.json  train and evaluate
    models/<model id>/                                   export
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from crackjax.atomic import atomic_path, write_json
from crackjax.errors import CrackjaxError, DatasetError
from crackjax.ingest import (
    RejectedFile,
    dataset_digest,
    dataset_table,
    scan_folder,
    split_records,
)
from crackjax.store import PartStore, digest_of

log = logging.getLogger(__name__)


def _write_table(path: Path, table: pa.Table) -> None:
    with atomic_path(path) as temp:
        pq.write_table(table, temp, write_page_checksum=True)


def _write_rejected(path: Path, rejected: list[RejectedFile]) -> None:
    from crackjax.export import write_rejected_csv

    with atomic_path(path) as temp:
        write_rejected_csv(temp, rejected)


def read_rejected(path: str | Path) -> list[RejectedFile]:
    """Read a rejected-files report written by a stage."""
    from crackjax.export import read_rejected_csv

    return read_rejected_csv(path)


def _report_failure(workspace: str | Path, error: DatasetError, earlier: list[RejectedFile]) -> DatasetError:
    """Write the files rejected before a failed run to `workspace/failed/rejected.csv`; return the error to raise."""
    rejected = earlier + [item for item in error.rejected if item not in earlier]
    if not rejected:
        return error
    path = Path(workspace) / "failed" / "rejected.csv"
    _write_rejected(path, rejected)
    return DatasetError(f"{error} (the {len(rejected)} rejected files are listed in {path})", rejected)


def ingest_stage(
    assets: str | Path,
    workspace: str | Path,
    *,
    label_from: str = "folder",
    prefix_separator: str = "_",
    train_fraction: float = 0.7,
    validation_fraction: float = 0.9,
    seed: int = 0,
    strict: bool = False,
) -> dict:
    """Scan `assets`, split it and write the dataset table and the rejected-files report."""
    started = time.perf_counter()
    scan = scan_folder(assets, label_from=label_from, prefix_separator=prefix_separator, strict=strict)
    try:
        assigned = split_records(scan.records, train_fraction=train_fraction, validation_fraction=validation_fraction, seed=seed)
    except DatasetError as error:
        located = DatasetError(f"image folder {scan.root}: {error}", error.rejected)
        raise _report_failure(workspace, located, scan.rejected) from None
    table = dataset_table(assigned)
    digest = dataset_digest(table)

    folder = Path(workspace) / "datasets" / digest[:16]
    _write_table(folder / "dataset.parquet", table)
    _write_rejected(folder / "rejected.csv", scan.rejected)
    counts = _split_counts(table)
    for item in scan.rejected:
        log.warning("ingest: skipped %s: %s", item.path, item.reason)
    log.info(
        "ingest: %d images in %d labels (%s) from %s, %d rejected, %d hidden or non-image files ignored in %.1f s",
        table.num_rows, len(counts), ", ".join(f"{label} {sum(split.values())}" for label, split in counts.items()),
        scan.root, len(scan.rejected), scan.hidden_skipped, time.perf_counter() - started,
    )
    return {
        "assets": str(Path(assets).expanduser().resolve()),
        "dataset": str(folder / "dataset.parquet"),
        "rejected": str(folder / "rejected.csv"),
        "digest": digest,
        "labels": sorted(counts),
        "counts": counts,
        "total_files": table.num_rows + len(scan.rejected),
    }


def preprocess_stage(ingested: dict, workspace: str | Path, input_size: int, *, strict: bool = False, max_rejected_fraction: float = 0.1) -> dict:
    """Decode the images not yet in the pixel store and write the table of usable rows."""
    from crackjax.preprocess import preprocess_images

    table = pq.read_table(ingested["dataset"])
    ingest_rejected = read_rejected(ingested["rejected"])
    try:
        result = preprocess_images(
            ingested["assets"], table, workspace, input_size,
            strict=strict, max_rejected_fraction=max_rejected_fraction, total_files=ingested["total_files"],
            ingest_rejected=ingest_rejected,
        )
    except DatasetError as error:
        raise _report_failure(workspace, error, ingest_rejected) from None
    rejected = ingest_rejected + result.rejected
    for item in result.rejected:
        log.warning("preprocess: skipped %s: %s", item.path, item.reason)

    folder = Path(ingested["dataset"]).parent / result.preprocess_key
    _write_table(folder / "dataset.parquet", result.table)
    _write_rejected(folder / "rejected.csv", rejected)
    return {
        "assets": ingested["assets"],
        "dataset": str(folder / "dataset.parquet"),
        "rejected": str(folder / "rejected.csv"),
        "digest": dataset_digest(result.table),
        "labels": ingested["labels"],
        "counts": _split_counts(result.table),
        "pixels": str(result.store_folder),
        "preprocess_key": result.preprocess_key,
        "input_size": input_size,
        "decoded": result.computed,
        "cached": result.cached,
        "rejected_count": len(rejected),
    }


def pixels_complete(preprocessed: dict) -> bool:
    """Return whether the pixel store still has every image of a (cached) preprocess result.

    A part moved aside as corrupt makes this false, so the flow decodes the images again.
    """
    keys = set(pq.read_table(preprocessed["dataset"], columns=["sha256"])["sha256"].to_pylist())
    return keys <= PartStore(preprocessed["pixels"]).keys()


def resolve_backbone_stage(name: str | None, weights_path: str | None, compute_dtype: str = "float32", engine: str = "auto") -> dict:
    """Resolve the backbone, its weights file (see `crackjax.backbones.resolve_backbone`) and its engine.

    `engine` "auto" becomes "xla" or "onnxruntime" as `crackjax.engines.choose_engine`
    decides; the result names the engine that runs, which keys the feature store.
    """
    from crackjax.backbones import file_sha256, resolve_backbone
    from crackjax.engines import choose_engine

    resolved = resolve_backbone(name, weights_path)
    sha256 = file_sha256(resolved.weights_path)
    choice = choose_engine(engine, resolved.backbone.name, resolved.weights.name, resolved.weights_path, sha256, compute_dtype)
    log.info("backbone: %s runs on engine %s (%s)", resolved.backbone.name, choice.engine, choice.reason)
    return {
        "name": resolved.backbone.name,
        "requested": name,
        "weights": resolved.weights.name,
        "weights_path": str(resolved.weights_path),
        "weights_sha256": sha256,
        "input_size": resolved.backbone.input_size,
        "feature_size": resolved.backbone.feature_size,
        "pixel_scaling": resolved.backbone.pixel_scaling,
        "compute_dtype": compute_dtype,
        "engine": choice.engine,
        "fallback_reason": resolved.fallback_reason,
    }


def _loaded(backbone: dict):
    from crackjax.bottleneck import load_backbone

    return load_backbone(
        backbone["name"], backbone["weights"], backbone["weights_path"], compute_dtype=backbone["compute_dtype"], engine=backbone.get("engine", "xla")
    )


def _feature_store(workspace: str | Path, backbone: dict, preprocess_key: str) -> PartStore:
    from crackjax.bottleneck import feature_store

    return feature_store(
        workspace, backbone["name"], backbone["weights"], backbone["weights_sha256"], preprocess_key, backbone["compute_dtype"], backbone["feature_size"],
        engine=backbone.get("engine", "xla"),
    )


def bottleneck_plan_stage(preprocessed: dict, backbone: dict, workspace: str | Path, *, shard_size: int = 512) -> dict:
    """List the image keys still missing from the feature store, cut into shards for `bottleneck_shard_stage`.

    With the bfloat16 compute dtype, `crackjax.engines.check_bfloat16` first compares
    bfloat16 and float32 features on a few of the dataset's photos, and raises
    CrackjaxError when they differ too much.
    """
    from crackjax.bottleneck import plan_bottleneck

    keys = pq.read_table(preprocessed["dataset"], columns=["sha256"])["sha256"].to_pylist()
    if backbone["compute_dtype"] == "bfloat16":
        # Checked before the store is opened, so a rejected run leaves no empty store behind.
        _check_bfloat16(preprocessed, backbone, keys)
    store = _feature_store(workspace, backbone, preprocessed["preprocess_key"])
    shards, cached = plan_bottleneck(keys, store, shard_size)
    plan_path = store.folder / "plans" / f"{digest_of(shards)[:16]}.json"
    write_json(plan_path, shards)
    return {"features": str(store.folder), "plan": str(plan_path), "shards": len(shards), "cached": cached, "missing": sum(map(len, shards))}


def _check_bfloat16(preprocessed: dict, backbone: dict, keys: list[str]) -> None:
    from crackjax.bottleneck import pixel_batches
    from crackjax.engines import PROBE_BATCH, check_bfloat16

    sample = sorted(set(keys))[:PROBE_BATCH]
    batch_keys, images = next(pixel_batches(PartStore(preprocessed["pixels"]), sample, backbone["input_size"], len(sample)))
    check_bfloat16(backbone["name"], backbone["weights"], backbone["weights_path"], backbone["weights_sha256"], images[: len(batch_keys)], batch_keys)


def bottleneck_shard_stage(plan: dict, index: int, preprocessed: dict, backbone: dict, workspace: str | Path, *, batch_size: int = 32) -> int:
    """Compute the features of shard `index` of the plan; return how many were computed.

    Shards are independent, so workers on other machines that share the workspace can
    run them in parallel.
    """
    from crackjax.bottleneck import compute_shard

    loaded = _loaded(backbone)
    pixels = PartStore(preprocessed["pixels"])
    store = _feature_store(workspace, backbone, preprocessed["preprocess_key"])
    # A rerun after an interruption skips the keys whose parts were already written.
    present = store.keys()
    keys = [key for key in json.loads(Path(plan["plan"]).read_text(encoding="utf-8"))[index] if key not in present]
    started = time.perf_counter()
    computed = compute_shard(loaded, pixels, store, keys, batch_size=batch_size)
    seconds = time.perf_counter() - started
    log.info("bottleneck shard %d: %d images in %.1f s (%.1f img/s)", index, computed, seconds, computed / seconds if seconds else 0.0)
    return computed


def bottleneck_finish_stage(plan: dict, computed: list[int], seconds: float, preprocessed: dict, backbone: dict, workspace: str | Path) -> dict:
    """Check that every image has features, recomputing any lost to a corrupt part, and summarise the stage."""
    from crackjax.bottleneck import CorruptPartError, compute_features, describe_counts, load_feature_matrix

    store = _feature_store(workspace, backbone, preprocessed["preprocess_key"])
    keys = pq.read_table(preprocessed["dataset"], columns=["sha256"])["sha256"].to_pylist()
    repaired = 0
    for _ in range(3):
        try:
            load_feature_matrix(store, keys, backbone["feature_size"])
            break
        except (CorruptPartError, KeyError) as error:
            log.warning("bottleneck: %s; recomputing the missing features", error)
            _, again, _ = compute_features(_loaded(backbone), PartStore(preprocessed["pixels"]), store, keys)
            repaired += again
    else:
        raise CrackjaxError(f"features in {store.folder} keep failing validation; check the disk, then delete that folder and run again")

    total_computed = sum(computed) + repaired
    log.info("bottleneck: %s", describe_counts(len(set(keys)), plan["cached"], total_computed, seconds))
    return {"features": str(store.folder), "cached": plan["cached"], "computed": total_computed, "seconds": seconds, "feature_size": backbone["feature_size"]}


def _split_arrays(preprocessed: dict, features: dict) -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
    from crackjax.bottleneck import load_feature_matrix

    table = pq.read_table(preprocessed["dataset"])
    store = PartStore(features["features"])
    arrays = {}
    for split in ("train", "validation", "test"):
        rows = table.filter(pc.equal(table["split"], split))
        keys = rows["sha256"].to_pylist()
        matrix = load_feature_matrix(store, keys, features["feature_size"])
        arrays[split] = (matrix, np.asarray(rows["label_id"].to_pylist(), np.int32), rows["path"].to_pylist())
    return arrays


def train_stage(preprocessed: dict, features: dict, head_config: dict, workspace: str | Path) -> dict:
    """Train the head on the train split, early-stopping on validation, and save it."""
    from crackjax.head import HeadConfig, train_head

    config = HeadConfig(**head_config)
    arrays = _split_arrays(preprocessed, features)
    x_train, y_train, _ = arrays["train"]
    x_validation, y_validation, _ = arrays["validation"]
    num_classes = len(preprocessed["labels"])
    log.info("train: %d train and %d validation features of size %d, %d classes", len(y_train), len(y_validation), x_train.shape[1], num_classes)
    trained = train_head(x_train, y_train, x_validation, y_validation, num_classes, config)

    key = digest_of({"dataset": preprocessed["digest"], "features": features["features"], "head": config.to_dict()})[:16]
    folder = Path(workspace) / "heads" / key
    flat = {"feature_mean": trained.feature_mean, "feature_std": trained.feature_std}
    for layer, values in trained.params.items():
        for name, value in values.items():
            flat[f"params/{layer}/{name}"] = value
    with atomic_path(folder / "head.npz") as temp:
        with open(temp, "wb") as handle:
            np.savez(handle, **flat)
    write_json(folder / "history.json", trained.history)
    best = trained.history[trained.best_epoch - 1]
    log.info(
        "train: %d epochs in %.1f s, best epoch %d: validation loss %.4f accuracy %.4f",
        len(trained.history), trained.seconds, trained.best_epoch, best["val_loss"], best["val_accuracy"],
    )
    return {
        "head": str(folder / "head.npz"),
        "history": str(folder / "history.json"),
        "config": config.to_dict(),
        "num_classes": num_classes,
        "best_epoch": trained.best_epoch,
        "epochs_run": len(trained.history),
        "validation_accuracy": best["val_accuracy"],
        "validation_loss": best["val_loss"],
        "seconds": trained.seconds,
    }


def load_head_npz(path: str | Path) -> dict:
    """Read a head saved by `train_stage` into the pytree `{params, feature_mean, feature_std}`."""
    with np.load(path) as data:
        state: dict = {"params": {}}
        for name in data.files:
            if name.startswith("params/"):
                _, layer, leaf = name.split("/")
                state["params"].setdefault(layer, {})[leaf] = data[name]
            else:
                state[name] = data[name]
    return state


def evaluate_stage(preprocessed: dict, features: dict, trained: dict) -> dict:
    """Compute validation and test metrics of the trained head and print the test table."""
    from crackjax.head import predict_proba
    from crackjax.metrics import classification_metrics, format_metrics_table

    state = load_head_npz(trained["head"])
    arrays = _split_arrays(preprocessed, features)
    labels = preprocessed["labels"]
    results = {}
    for split in ("validation", "test"):
        matrix, label_ids, _ = arrays[split]
        probabilities = predict_proba(state["params"], state["feature_mean"], state["feature_std"], matrix, len(labels), trained["config"]["hidden_units"])
        results[split] = classification_metrics(label_ids, probabilities, labels)
    table = format_metrics_table(results["test"], "test")
    log.info("evaluate:\n%s", table)
    path = Path(trained["head"]).parent / "evaluation.json"
    write_json(path, results)
    return {"metrics": str(path), "validation_accuracy": results["validation"]["accuracy"], "test_accuracy": results["test"]["accuracy"], "test_table": table}


def export_stage(
    workspace: str | Path,
    *,
    preprocessed: dict,
    backbone: dict,
    features: dict,
    trained: dict,
    evaluated: dict,
    model_id: str | None = None,
) -> dict:
    """Write the model folder: orbax checkpoint of the head, manifest, metrics, history, rejected files."""
    from crackjax.export import export_model, new_model_id
    from crackjax.images import RESIZE_METHOD

    metrics = json.loads(Path(evaluated["metrics"]).read_text(encoding="utf-8"))
    history = json.loads(Path(trained["history"]).read_text(encoding="utf-8"))
    manifest = {
        "labels": preprocessed["labels"],
        "backbone": {key: backbone[key] for key in ("name", "requested", "weights", "weights_sha256", "input_size", "feature_size", "pixel_scaling", "compute_dtype", "engine", "fallback_reason")},
        "preprocessing": {"input_size": preprocessed["input_size"], "resize": RESIZE_METHOD, "preprocess_key": preprocessed["preprocess_key"], "color": "RGB", "exif_orientation": True},
        "head": {**trained["config"], "num_classes": trained["num_classes"], "best_epoch": trained["best_epoch"], "epochs_run": trained["epochs_run"]},
        "metrics": {
            "validation": {key: metrics["validation"][key] for key in ("accuracy", "macro_f1", "roc_auc", "count")},
            "test": {key: metrics["test"][key] for key in ("accuracy", "macro_f1", "roc_auc", "count")},
        },
        "data": {"assets": preprocessed["assets"], "digest": preprocessed["digest"], "counts": preprocessed["counts"], "rejected": preprocessed["rejected_count"]},
        "features": {"store": features["features"]},
    }
    model_id = model_id or new_model_id(preprocessed["digest"])
    folder = export_model(
        workspace,
        model_id=model_id,
        head_state=load_head_npz(trained["head"]),
        manifest=manifest,
        metrics=metrics,
        history=history,
        rejected=read_rejected(preprocessed["rejected"]),
    )
    return {"model_dir": str(folder), "model_id": model_id}


def _split_counts(table: pa.Table) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for label, split in zip(table["label"].to_pylist(), table["split"].to_pylist()):
        counts.setdefault(label, {"train": 0, "validation": 0, "test": 0})[split] += 1
    return dict(sorted(counts.items()))
