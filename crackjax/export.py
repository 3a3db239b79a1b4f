"""Export: write a trained head and everything prediction needs into a model folder.

`workspace/models/<model-id>/` contains an orbax checkpoint of the head
(`checkpoint/`), `manifest.json` (labels, backbone and weights sha256, preprocessing,
input size, metrics, data digest, crackjax version, and the sha256 of every checkpoint
file), `metrics.json`, `history.json` and `rejected.csv`. The folder is assembled
under a temporary name and renamed into place, so a model folder is either complete
or absent. Loading checks the checkpoint files against the manifest, so a damaged
model is rejected rather than used.
"""

from __future__ import annotations

import csv
import datetime
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np

from crackjax import __version__
from crackjax.atomic import TEMP_PREFIX, fsync_dir, raise_if_no_space, write_json
from crackjax.errors import ModelError
from crackjax.ingest import RejectedFile

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1

# Temporary folders of exports older than this are left over from killed runs and
# removed by the next export; a live export takes seconds.
STALE_EXPORT_SECONDS = 3600


def models_dir(workspace: str | Path) -> Path:
    """Return the folder that contains the model folders of `workspace`."""
    return Path(workspace) / "models"


def new_model_id(data_digest: str) -> str:
    """Return a sortable model id: UTC time, then a short data digest and a random suffix."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{now}-{data_digest[:8]}-{uuid.uuid4().hex[:4]}"


def write_rejected_csv(path: str | Path, rejected: list[RejectedFile]) -> None:
    """Write the rejected-files report (`path,reason,kind`) to `path`."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "reason", "kind"])
        for item in rejected:
            writer.writerow([item.path, item.reason, item.kind])


def read_rejected_csv(path: str | Path) -> list[RejectedFile]:
    """Read a rejected-files report; reports without a `kind` column count every row as unreadable."""
    with open(path, newline="", encoding="utf-8") as handle:
        return [RejectedFile(row["path"], row["reason"], row.get("kind") or "unreadable") for row in csv.DictReader(handle)]


def export_model(
    workspace: str | Path,
    *,
    model_id: str,
    head_state: dict,
    manifest: dict,
    metrics: dict,
    history: list[dict],
    rejected: list[RejectedFile],
) -> Path:
    """Write a complete model folder and return its path.

    `head_state` is the pytree saved with orbax: `params`, `feature_mean`,
    `feature_std`. `manifest` gets `model_id`, `format_version`, `created_at` and
    `crackjax_version` added.
    """
    import orbax.checkpoint as ocp

    root = models_dir(workspace)
    root.mkdir(parents=True, exist_ok=True)
    final = root / model_id
    if final.exists():
        raise ModelError(f"model folder {final} already exists; model ids must be unique")
    _remove_stale_exports(root)
    temporary = root / f"{TEMP_PREFIX}{model_id}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()

    try:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(temporary / "checkpoint", _to_numpy(head_state))
        checkpointer.wait_until_finished()
        checkpointer.close()

        manifest = {
            "format_version": FORMAT_VERSION,
            "model_id": model_id,
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "crackjax_version": __version__,
            **manifest,
        }
        write_json(temporary / "metrics.json", metrics)
        write_json(temporary / "history.json", history)
        write_rejected_csv(temporary / "rejected.csv", rejected)
        manifest["checkpoint_sha256"] = checkpoint_digests(temporary / "checkpoint")
        # The manifest is written last: a folder with a manifest is complete.
        write_json(temporary / MANIFEST_NAME, manifest)
        os.replace(temporary, final)
        fsync_dir(root)
    except BaseException as error:
        shutil.rmtree(temporary, ignore_errors=True)
        raise_if_no_space(error, final)
        raise

    log.info("export: model %s written to %s", model_id, final)
    return final


def checkpoint_digests(checkpoint: str | Path) -> dict[str, str]:
    """Return the sha256 of every file under `checkpoint`, by POSIX path relative to it."""
    from crackjax.digests import file_digest

    checkpoint = Path(checkpoint)
    return {path.relative_to(checkpoint).as_posix(): file_digest(path) for path in sorted(checkpoint.rglob("*")) if path.is_file()}


def _remove_stale_exports(root: Path) -> None:
    """Remove temporary export folders left by runs killed more than STALE_EXPORT_SECONDS ago."""
    now = time.time()
    for folder in root.glob(f"{TEMP_PREFIX}*"):
        try:
            age = now - folder.stat().st_mtime
        except FileNotFoundError:
            continue
        if age > STALE_EXPORT_SECONDS:
            log.info("export: removing %s, left by an interrupted export", folder)
            shutil.rmtree(folder, ignore_errors=True)


def list_models(workspace: str | Path) -> list[dict]:
    """Return the manifests of the complete models of `workspace`, oldest first.

    Temporary folders of interrupted exports and folders without a readable manifest
    are left out.
    """
    root = models_dir(workspace)
    manifests = []
    if not root.is_dir():
        return manifests
    for folder in sorted(root.iterdir()):
        if folder.name.startswith(TEMP_PREFIX) or not folder.is_dir():
            continue
        try:
            manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        manifest["path"] = str(folder)
        manifests.append(manifest)
    return sorted(manifests, key=lambda item: (item.get("created_at", ""), item.get("model_id", "")))


def newest_model(workspace: str | Path) -> Path:
    """Return the folder of the newest complete model of `workspace`, or raise ModelError."""
    models = list_models(workspace)
    if not models:
        raise ModelError(f"no trained model in {models_dir(workspace)}; run `crackjax train` first or pass --model DIR")
    return Path(models[-1]["path"])


def read_manifest(model_dir: str | Path) -> dict:
    """Return the manifest of `model_dir`, or raise ModelError naming what is wrong."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelError(f"model folder {model_dir} not found; pass a folder under workspace/models or train a model first")
    path = model_dir / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path} not found; {model_dir} is not a complete crackjax model folder, so train again or pass another --model") from None
    except (OSError, ValueError) as error:
        raise ModelError(f"{path} is unreadable ({error}); the model folder is corrupt, so train again or pass another --model") from None
    for key in ("labels", "backbone", "head"):
        if key not in manifest:
            raise ModelError(f"{path} has no {key!r} entry; the model folder is corrupt or from another tool, so train again")
    return manifest


def load_head_state(model_dir: str | Path) -> dict:
    """Restore the head pytree (`params`, `feature_mean`, `feature_std`) of `model_dir`."""
    import orbax.checkpoint as ocp

    checkpoint = Path(model_dir).resolve() / "checkpoint"
    if not checkpoint.is_dir():
        raise ModelError(f"{checkpoint} not found; the model folder is incomplete, so train again or pass another --model")
    _verify_checkpoint(Path(model_dir), checkpoint)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            state = checkpointer.restore(checkpoint)
    except Exception as error:  # orbax raises many types (ValueError, FileNotFoundError, tensorstore errors)
        raise ModelError(f"cannot restore the checkpoint {checkpoint} ({type(error).__name__}: {error}); the model folder is corrupt, so train again") from None
    return _to_numpy(state)


def _verify_checkpoint(model_dir: Path, checkpoint: Path) -> None:
    """Raise ModelError when a checkpoint file is missing, added or changed since export.

    Models exported before the manifest listed `checkpoint_sha256` are not checked.
    """
    try:
        expected = json.loads((model_dir / MANIFEST_NAME).read_text(encoding="utf-8")).get("checkpoint_sha256")
    except (OSError, ValueError):
        expected = None
    if not expected:
        return
    actual = checkpoint_digests(checkpoint)
    for name in sorted(set(expected) | set(actual)):
        if name not in actual:
            problem = "is missing"
        elif name not in expected:
            problem = "was added after export"
        elif actual[name] != expected[name]:
            problem = f"has sha256 {actual[name][:12]}..., but the manifest records {expected[name][:12]}..."
        else:
            continue
        raise ModelError(f"checkpoint file {checkpoint / name} {problem}; the model folder is corrupt, so train again or pass another --model")


def _to_numpy(tree):
    if isinstance(tree, dict):
        return {key: _to_numpy(value) for key, value in tree.items()}
    return np.asarray(tree)
