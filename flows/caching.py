"""Content-keyed caching for the crack-train tasks.

A task's cache key is a digest of its input data (the digests that upstream stages
return, or the image folder's fingerprint for ingest), its parameters, and a digest
of the source of every crackjax module the stage depends on. Results are persisted
in the workspace, so each workspace has its own cache.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.locking.filesystem import FileSystemLockManager

from crackjax.store import digest_of
from crackjax.versioning import code_digest

STAGE_MODULES = {
    "ingest": ("crackjax.ingest", "crackjax.images"),
    "preprocess": ("crackjax.preprocess", "crackjax.images", "crackjax.store", "crackjax.stages"),
    "train": ("crackjax.head", "crackjax.stages"),
    "evaluate": ("crackjax.head", "crackjax.metrics", "crackjax.stages"),
    "export": ("crackjax.export", "crackjax.stages"),
}


@dataclasses.dataclass
class StageCachePolicy(CachePolicy):
    """The cache policy of one crack-train stage.

    `key_inputs(parameters)` returns what identifies the stage's input (by default the
    parameters themselves, which carry upstream digests).
    """

    stage: str = ""
    key_inputs: Callable[[dict], Any] | None = None

    def compute_key(self, task_ctx, inputs: dict, flow_parameters: dict, **kwargs) -> str:
        identity = self.key_inputs(inputs) if self.key_inputs else inputs
        code = code_digest(*STAGE_MODULES[self.stage])
        return f"{self.stage}-{digest_of({'inputs': _jsonable(identity), 'code': code})[:32]}"


def stage_cache_policy(stage: str, key_inputs: Callable[[dict], Any] | None = None) -> StageCachePolicy:
    """Return the cache policy of `stage`; `locked_policy` binds it to a workspace."""
    return StageCachePolicy(stage=stage, key_inputs=key_inputs)


def locked_policy(policy: CachePolicy, storage: Path) -> CachePolicy:
    """Store `policy`'s cache records in `storage` and serialise runs that share a key.

    With SERIALIZABLE isolation, a second run with the same key (a scheduled and a
    manual run that overlap) waits for the first to finish its record, then reads it
    instead of computing the stage again or reading a half-written record.
    """
    return policy.configure(
        key_storage=storage / "records",
        isolation_level="SERIALIZABLE",
        lock_manager=FileSystemLockManager(lock_files_directory=storage / "locks"),
    )


def result_storage(workspace: str | Path) -> Path:
    """Return the folder for persisted task results and cache records of `workspace`.

    Prefect 3 accepts a `Path` as result storage and reads it as a local file system.
    """
    folder = Path(workspace).expanduser().resolve() / ".prefect-results"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def outputs_exist(result: dict) -> bool:
    """Return whether every file or folder a cached stage result names still exists."""
    for key, value in result.items():
        if key in ("dataset", "rejected", "pixels", "features", "plan", "head", "history", "metrics", "model_dir") and isinstance(value, str):
            if not os.path.exists(value):
                return False
    return True


# Fields of stage results that describe how a run went, not what it produced. The
# weights file is identified by its sha256, so its path and the text of a fallback
# (which names the cache folder and the download error) do not key a stage either.
_VOLATILE_FIELDS = frozenset({"seconds", "computed", "cached", "decoded", "weights_path", "fallback_reason"})


def _jsonable(value):
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items() if key not in _VOLATILE_FIELDS}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
