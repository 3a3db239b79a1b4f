"""Model registry: numbered model versions with lineage, and the champion that predict uses.

`workspace/models/registry.json` lists every registered model folder of the workspace
as a version (1, 2, ...) with its lineage (data digest, backbone, weights sha256, code
version, parent version) and its validation metrics. One version is the champion.
A new version replaces the champion only when its validation metric is not worse than
the champion's on the same validation images (see `PromotionRule`), unless promotion
is forced. Every change is a read-modify-write of the whole file under a file lock
(`registry.json.lock`), and the file is replaced atomically. Concurrent training runs
on one workspace therefore keep every version (tests/test_registry.py runs two
registering processes at once).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from crackjax.atomic import write_json
from crackjax.errors import CrackjaxError, ModelError
from crackjax.export import list_models, models_dir, newest_model, read_manifest

log = logging.getLogger(__name__)

REGISTRY_NAME = "registry.json"
REGISTRY_FORMAT = 1
METRICS = ("accuracy", "macro_f1", "loss")
PROMOTE_MODES = ("auto", "force", "never")
CHAMPION = "champion"

# Seconds a registration waits for another process that holds the registry lock. A
# holder may be re-evaluating the champion on new validation images with the full
# backbone, which takes about as long as one bottleneck pass over the validation split.
LOCK_TIMEOUT_SECONDS = 900.0


class RegistryError(CrackjaxError):
    """The registry file is unreadable, or a version asked for is not in it."""


@dataclasses.dataclass(frozen=True)
class PromotionRule:
    """When a new version replaces the champion.

    `metric` is a validation metric: `accuracy` and `macro_f1` (higher is better) or
    `loss`, the mean cross-entropy of the true label (lower is better). The new version
    is promoted when its value is no worse than the champion's by more than
    `tolerance`, in the metric's own unit, both measured on the new run's validation split.
    """

    metric: str = "accuracy"
    tolerance: float = 0.0

    def __post_init__(self):
        if self.metric not in METRICS:
            raise CrackjaxError(f"promotion metric {self.metric!r} is unknown; use one of {', '.join(METRICS)}")
        if not self.tolerance >= 0.0:
            raise CrackjaxError(f"promotion tolerance must be zero or positive, not {self.tolerance}")

    @property
    def higher_is_better(self) -> bool:
        return self.metric != "loss"

    def accepts(self, candidate: float, champion: float) -> bool:
        """Return whether `candidate` is not worse than `champion` beyond the tolerance."""
        if self.higher_is_better:
            return candidate >= champion - self.tolerance
        return candidate <= champion + self.tolerance

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class ValidationSet:
    """The validation split of a training run, with its bottleneck features.

    `features` is `(n, feature_size) float32` from the run's feature store, computed by
    the backbone that `feature_source` describes (`name`, `weights_sha256`,
    `compute_dtype`, `preprocess_key`). `paths` are the image files, used when a model
    with another backbone has to be evaluated on the same images.
    """

    data_digest: str
    labels: list[str]
    label_ids: np.ndarray
    paths: list[Path]
    features: np.ndarray
    feature_source: dict


def validation_set(preprocessed: dict, features: dict, backbone: dict) -> ValidationSet:
    """Load the validation split of a crack-train run from the results of its stages.

    `preprocessed`, `features` and `backbone` are the dicts that
    `crackjax.stages.preprocess_stage`, `bottleneck_finish_stage` and
    `resolve_backbone_stage` return.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from crackjax.bottleneck import load_feature_matrix
    from crackjax.store import PartStore

    table = pq.read_table(preprocessed["dataset"])
    rows = table.filter(pc.equal(table["split"], "validation"))
    keys = rows["sha256"].to_pylist()
    matrix = load_feature_matrix(PartStore(features["features"]), keys, features["feature_size"])
    assets = Path(preprocessed["assets"])
    return ValidationSet(
        data_digest=preprocessed["digest"],
        labels=list(preprocessed["labels"]),
        label_ids=np.asarray(rows["label_id"].to_pylist(), np.int64),
        paths=[assets / path for path in rows["path"].to_pylist()],
        features=matrix,
        feature_source={
            "name": backbone["name"],
            "weights_sha256": backbone["weights_sha256"],
            "compute_dtype": backbone["compute_dtype"],
            "engine": backbone.get("engine", "xla"),
            "preprocess_key": preprocessed["preprocess_key"],
        },
    )


def validation_metrics(label_ids: np.ndarray, probabilities: np.ndarray, labels: list[str]) -> dict:
    """Return accuracy, macro F1 and mean cross-entropy loss of `(n, classes)` probabilities."""
    from crackjax.metrics import classification_metrics

    metrics = classification_metrics(label_ids, probabilities, labels)
    true_probability = np.asarray(probabilities, np.float64)[np.arange(len(label_ids)), np.asarray(label_ids)]
    loss = float(-np.log(np.clip(true_probability, 1e-7, 1.0)).mean()) if len(label_ids) else 0.0
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "loss": loss, "count": metrics["count"]}


def evaluate_model(model_dir: str | Path, validation: ValidationSet, *, weights_path: str | Path | None = None) -> dict:
    """Evaluate the model in `model_dir` on `validation` and return `validation_metrics`.

    The run's features are reused when the model was trained on features of the same
    backbone, weights file, dtype and preprocessing. Otherwise the model's own backbone
    classifies the validation images. Raises ModelError when the model's labels differ
    from the validation labels or an image cannot be read.
    """
    manifest = read_manifest(model_dir)
    model_labels = list(manifest["labels"])
    if sorted(model_labels) != sorted(validation.labels):
        raise ModelError(
            f"model {manifest.get('model_id')} has labels {model_labels}, the validation split has {validation.labels}; "
            "models of different label sets cannot be compared"
        )

    source = _feature_source(manifest)
    if source == validation.feature_source:
        from crackjax.export import load_head_state
        from crackjax.head import predict_proba

        state = load_head_state(model_dir)
        probabilities = predict_proba(
            state["params"], state["feature_mean"], state["feature_std"], validation.features, len(model_labels), manifest["head"]["hidden_units"]
        )
        how = "reusing the run's features"
    else:
        from crackjax.predict import Predictor

        predictor = Predictor(model_dir, weights_path=weights_path)
        predictions = predictor.predict_files(validation.paths)
        failed = [prediction for prediction in predictions if prediction.error]
        if failed:
            raise ModelError(f"cannot evaluate model {manifest.get('model_id')}: {failed[0].path}: {failed[0].error}")
        probabilities = np.asarray([[prediction.probabilities[label] for label in model_labels] for prediction in predictions])
        how = f"with its own backbone {manifest['backbone']['name']}"

    # Reorder the probability columns from the model's label order to the validation's.
    columns = [model_labels.index(label) for label in validation.labels]
    metrics = validation_metrics(validation.label_ids, np.asarray(probabilities)[:, columns], validation.labels)
    log.info(
        "registry: evaluated model %s on %d validation images %s: accuracy %.4f, macro F1 %.4f, loss %.4f",
        manifest.get("model_id"), metrics["count"], how, metrics["accuracy"], metrics["macro_f1"], metrics["loss"],
    )
    return metrics


def _feature_source(manifest: dict) -> dict:
    backbone = manifest["backbone"]
    return {
        "name": backbone["name"],
        "weights_sha256": backbone["weights_sha256"],
        "compute_dtype": backbone.get("compute_dtype", "float32"),
        "engine": backbone.get("engine", "xla"),
        "preprocess_key": manifest.get("preprocessing", {}).get("preprocess_key"),
    }


# Reading and writing the registry file.


def registry_path(workspace: str | Path) -> Path:
    """Return the path of the registry file of `workspace`."""
    return models_dir(workspace) / REGISTRY_NAME


def _empty_registry() -> dict:
    return {"format_version": REGISTRY_FORMAT, "champion": None, "versions": [], "events": []}


def load_registry(workspace: str | Path) -> dict:
    """Return the registry of `workspace`; an empty registry when the file does not exist."""
    path = registry_path(workspace)
    try:
        registry = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return _empty_registry()
    except (OSError, ValueError) as error:
        raise RegistryError(f"{path} is unreadable ({error}); restore it from a backup or delete it to start a new registry") from None
    if not isinstance(registry, dict) or "versions" not in registry:
        raise RegistryError(f"{path} is not a crackjax model registry; move it away to start a new registry")
    return registry


@contextmanager
def _locked_registry(workspace: str | Path, timeout: float = LOCK_TIMEOUT_SECONDS) -> Iterator[dict]:
    """Yield the registry under the registry lock and write it back atomically if the block succeeds."""
    from filelock import FileLock, Timeout

    path = registry_path(workspace)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("registry: waiting for another process to release %s.lock", path)
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            raise RegistryError(f"timed out after {timeout:.0f} s waiting for {path}.lock; check for a hung crack-train run on this workspace") from None
    try:
        registry = load_registry(workspace)
        yield registry
        write_json(path, registry)
    finally:
        lock.release()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _find(registry: dict, identifier: str | int) -> dict | None:
    """Return the version whose number (`3`, `v3`) or model id is `identifier`."""
    text = str(identifier).strip()
    number = text[1:] if text[:1] in ("v", "V") else text
    for version in registry["versions"]:
        if version["model_id"] == text or (number.isdigit() and version["version"] == int(number)):
            return version
    return None


def get_version(workspace: str | Path, identifier: str | int) -> dict:
    """Return the registry entry of a version number or model id, or raise RegistryError."""
    registry = load_registry(workspace)
    if str(identifier) == CHAMPION:
        identifier = registry.get("champion") or ""
    version = _find(registry, identifier)
    if version is None:
        raise RegistryError(f"model version {identifier!r} not found in {registry_path(workspace)}; run `crackjax models list` to see the versions")
    return version


# Champion and model lookup for predict.


def champion_dir(workspace: str | Path) -> Path:
    """Return the champion's model folder, or the newest model folder when no version is champion.

    Raises ModelError when the workspace has no model, or when the champion's folder
    was deleted.
    """
    registry = load_registry(workspace)
    champion = registry.get("champion")
    if not champion:
        return newest_model(workspace)
    folder = models_dir(workspace) / champion
    if not folder.is_dir():
        raise ModelError(
            f"champion model folder {folder} not found; promote another version with `crackjax models promote VERSION` "
            f"(see `crackjax models list --workspace {workspace}`)"
        )
    return folder


def resolve_model(workspace: str | Path, model: str | None = None) -> Path:
    """Return the folder of `model`: None or "champion" for the champion, a version number, a model id, or a folder path."""
    if model is None or str(model) == CHAMPION:
        return champion_dir(workspace)
    version = _find(load_registry(workspace), model)
    if version is not None:
        return models_dir(workspace) / version["model_id"]
    if (models_dir(workspace) / str(model)).is_dir():
        return models_dir(workspace) / str(model)
    if Path(model).expanduser().is_dir():
        return Path(model).expanduser()
    raise ModelError(f"model {model!r} is neither a version, a model id nor a folder in {models_dir(workspace)}; run `crackjax models list`")


def version_of(workspace: str | Path, model_dir: str | Path) -> int | None:
    """Return the version number of the model folder `model_dir`, or None when it is not registered."""
    version = _find(load_registry(workspace), Path(model_dir).name)
    return version["version"] if version else None


# Registration and promotion.


def register_model(
    workspace: str | Path,
    model_dir: str | Path,
    validation: ValidationSet,
    *,
    rule: PromotionRule = PromotionRule(),
    promote: str = "auto",
    lineage: dict | None = None,
    lock_timeout: float = LOCK_TIMEOUT_SECONDS,
) -> dict:
    """Add the model in `model_dir` as a new version and decide whether it becomes champion.

    `promote` is "auto" (apply `rule` against the champion), "force" (promote without
    comparing) or "never" (register without promoting). `lineage` adds fields such as
    `code_version` and `flow_run_id` to the version's lineage. A model that is already
    registered (an export that was a cache hit) is not added again: the result has
    status "unchanged", unless `promote` is "force" and it is not champion.

    Returns a dict with `status` ("promoted", "rejected" or "unchanged"), `version`,
    `model_id`, `champion` (model id after the decision), `previous_champion`,
    `metrics` (the new version's validation metrics), `champion_metrics` (the previous
    champion's on the same images, or None), `rule` and `reason`.
    """
    if promote not in PROMOTE_MODES:
        raise CrackjaxError(f"promote {promote!r} is unknown; use one of {', '.join(PROMOTE_MODES)}")
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    model_id = manifest["model_id"]
    if model_dir.resolve() != (models_dir(workspace) / model_id).resolve():
        raise ModelError(f"model folder {model_dir} is not in {models_dir(workspace)}; only models of this workspace can be registered")

    already = _find(load_registry(workspace), model_id)
    metrics = already["metrics"] if already else evaluate_model(model_dir, validation)

    with _locked_registry(workspace, lock_timeout) as registry:
        previous = registry.get("champion")
        existing = _find(registry, model_id)
        if existing is not None:
            result = _reregister(registry, existing, promote)
        else:
            champion_metrics, promoted, reason = _decide(workspace, registry, validation, metrics, rule, promote)
            existing = {
                "version": max((item["version"] for item in registry["versions"]), default=0) + 1,
                "model_id": model_id,
                "registered_at": _now(),
                "decision": "promoted" if promoted else "rejected",
                "reason": reason,
                "metrics": metrics,
                "rule": rule.to_dict(),
                "promote": promote,
                "lineage": _lineage(manifest, previous, validation, lineage or {}),
            }
            registry["versions"].append(existing)
            if promoted:
                registry["champion"] = model_id
            registry["events"].append({"at": existing["registered_at"], "event": existing["decision"], "model_id": model_id, "version": existing["version"], "reason": reason})
            result = {"status": existing["decision"], "reason": reason, "champion_metrics": champion_metrics}

    result.update({
        "version": existing["version"],
        "model_id": model_id,
        "model_dir": str(model_dir),
        "champion": registry["champion"],
        "previous_champion": previous,
        "metrics": metrics,
        "rule": rule.to_dict(),
    })
    _log_result(result)
    return result


def _reregister(registry: dict, existing: dict, promote: str) -> dict:
    if promote == "force" and registry.get("champion") != existing["model_id"]:
        reason = f"version {existing['version']} was already registered; promotion forced by promote='force'"
        registry["champion"] = existing["model_id"]
        registry["events"].append({"at": _now(), "event": "promoted", "model_id": existing["model_id"], "version": existing["version"], "reason": reason})
        return {"status": "promoted", "reason": reason, "champion_metrics": None}
    role = "the champion" if registry.get("champion") == existing["model_id"] else f"{existing['decision']}, not champion"
    reason = f"model {existing['model_id']} is already registered as version {existing['version']} ({role}); the export was a cache hit"
    return {"status": "unchanged", "reason": reason, "champion_metrics": None}


def _decide(workspace, registry: dict, validation: ValidationSet, metrics: dict, rule: PromotionRule, promote: str) -> tuple[dict | None, bool, str]:
    """Return the champion's metrics on the same images (or None), whether to promote, and why."""
    champion = registry.get("champion")
    if promote == "force":
        return None, True, "promotion forced by promote='force'"
    if promote == "never":
        return None, False, "registered without promotion because promote='never'"
    if not champion:
        return None, True, "first registered model of the workspace"

    champion_version = _find(registry, champion)
    folder = models_dir(workspace) / champion
    if champion_version is None or not folder.is_dir():
        log.warning("registry: champion %s has no model folder in %s; promoting the new model", champion, models_dir(workspace))
        return None, True, f"champion {champion} has no model folder; promoted in its place"

    same_data = champion_version.get("lineage", {}).get("data_digest") == validation.data_digest
    if same_data and rule.metric in champion_version.get("metrics", {}):
        champion_metrics = champion_version["metrics"]
        where = "the same validation split"
    else:
        try:
            champion_metrics = evaluate_model(folder, validation)
        except ModelError as error:
            return None, False, f"champion {champion} could not be evaluated on the new validation split ({error}); use promote='force' to replace it"
        where = f"the new validation split ({metrics['count']} images; the champion was trained on other data)"

    candidate_value = metrics[rule.metric]
    champion_value = champion_metrics[rule.metric]
    comparison = (
        f"validation {rule.metric} {candidate_value:.4f} against champion version {champion_version['version']} "
        f"({champion}) {champion_value:.4f} on {where}, tolerance {rule.tolerance:g}"
    )
    if rule.accepts(candidate_value, champion_value):
        return champion_metrics, True, f"not worse than the champion: {comparison}"
    return champion_metrics, False, f"worse than the champion: {comparison}"


def _lineage(manifest: dict, parent: str | None, validation: ValidationSet, extra: dict) -> dict:
    backbone = manifest["backbone"]
    data = manifest.get("data", {})
    return {
        "data_digest": data.get("digest", validation.data_digest),
        "assets": data.get("assets"),
        "counts": data.get("counts"),
        "backbone": backbone["name"],
        "weights": backbone.get("weights"),
        "weights_sha256": backbone["weights_sha256"],
        "head": manifest.get("head"),
        "crackjax_version": manifest.get("crackjax_version"),
        "parent": parent,
        **extra,
    }


def _log_result(result: dict) -> None:
    message = "registry: model %s version %d %s (champion: %s): %s"
    arguments = (result["model_id"], result["version"], result["status"], result["champion"], result["reason"])
    if result["status"] == "rejected":
        log.warning(message, *arguments)
    else:
        log.info(message, *arguments)


def promote_version(workspace: str | Path, identifier: str | int, reason: str = "promoted by hand") -> dict:
    """Make a registered version (number or model id) the champion and return its entry.

    A model folder of the workspace that is not registered yet is registered first,
    with the lineage its manifest records.
    """
    with _locked_registry(workspace) as registry:
        version = _find(registry, identifier)
        if version is None:
            version = _register_folder(workspace, registry, str(identifier))
        folder = models_dir(workspace) / version["model_id"]
        if not folder.is_dir():
            raise ModelError(f"model folder {folder} of version {version['version']} not found; it cannot become champion")
        previous = registry.get("champion")
        registry["champion"] = version["model_id"]
        registry["events"].append({"at": _now(), "event": "promoted", "model_id": version["model_id"], "version": version["version"], "reason": reason, "previous_champion": previous})
    log.info("registry: version %d (%s) is now champion, replacing %s: %s", version["version"], version["model_id"], previous, reason)
    return version


def _register_folder(workspace, registry: dict, model_id: str) -> dict:
    folder = models_dir(workspace) / model_id
    if not (folder / "manifest.json").is_file():
        raise RegistryError(f"model version {model_id!r} not found in {registry_path(workspace)} or {models_dir(workspace)}; run `crackjax models list`")
    manifest = read_manifest(folder)
    validation_metrics_of_manifest = manifest.get("metrics", {}).get("validation", {})
    version = {
        "version": max((item["version"] for item in registry["versions"]), default=0) + 1,
        "model_id": model_id,
        "registered_at": _now(),
        "decision": "promoted",
        "reason": "registered by hand from its manifest",
        "metrics": {key: validation_metrics_of_manifest[key] for key in ("accuracy", "macro_f1", "count") if key in validation_metrics_of_manifest},
        "rule": None,
        "promote": "force",
        "lineage": {
            "data_digest": manifest.get("data", {}).get("digest"),
            "assets": manifest.get("data", {}).get("assets"),
            "backbone": manifest["backbone"]["name"],
            "weights": manifest["backbone"].get("weights"),
            "weights_sha256": manifest["backbone"]["weights_sha256"],
            "head": manifest.get("head"),
            "crackjax_version": manifest.get("crackjax_version"),
            "parent": registry.get("champion"),
        },
    }
    registry["versions"].append(version)
    return version


def list_versions(workspace: str | Path) -> list[dict]:
    """Return the registered versions, oldest first, with `champion` set on each and
    the unregistered model folders of the workspace appended with `version` None."""
    registry = load_registry(workspace)
    champion = registry.get("champion")
    rows = [{**version, "champion": version["model_id"] == champion} for version in registry["versions"]]
    registered = {version["model_id"] for version in registry["versions"]}
    for manifest in list_models(workspace):
        if manifest["model_id"] not in registered:
            rows.append({
                "version": None,
                "model_id": manifest["model_id"],
                "registered_at": manifest.get("created_at"),
                "decision": "unregistered",
                "reason": "exported without registration",
                "metrics": manifest.get("metrics", {}).get("validation", {}),
                "lineage": {"backbone": manifest["backbone"]["name"], "data_digest": manifest.get("data", {}).get("digest")},
                "champion": False,
            })
    return rows
