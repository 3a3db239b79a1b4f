"""Atomic writes: a reader sees the old file or the complete new one, never a partial file."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from crackjax.errors import DiskFullError

TEMP_PREFIX = ".tmp-"

# errno values that mean "no room for this write": disk full, file-size limit, quota.
_NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Read once at import, because os.umask can only be read by setting it, which is not
# thread-safe.
_UMASK = _read_umask()


def temporary_path(folder: str | Path, name: str) -> Path:
    """Create an empty, uniquely named temporary file in `folder` for a later `commit_file` to `name`.

    mkstemp creates the file readable by its owner only. It gets the permissions of a
    plainly created file instead (0o666 less the umask), so others who share the
    workspace can read it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=TEMP_PREFIX + name + ".", dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
    finally:
        os.close(fd)
    return Path(temp_name)


def commit_file(temp: Path, target: Path) -> None:
    """Fsync `temp`, rename it onto `target` and fsync the folder, so `target` is whole or absent."""
    with open(temp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temp, target)
    fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success, fsync it and rename it onto `target`.

    On an exception the temporary file is removed and `target` is left as it was. An
    OSError for a full disk, a file-size limit or a quota becomes DiskFullError.
    """
    target = Path(target)
    temp = temporary_path(target.parent, target.name)
    try:
        yield temp
        commit_file(temp, target)
    except BaseException as error:
        temp.unlink(missing_ok=True)
        raise_if_no_space(error, target)
        raise


def raise_if_no_space(error: BaseException, target: str | Path) -> None:
    """Raise DiskFullError from `error` when it is an OSError for a full disk, size limit or quota."""
    if isinstance(error, OSError) and _no_space(error):
        raise DiskFullError(
            f"cannot write {target}: {error.strerror or error}; the disk is full or a file-size limit was reached, "
            f"so free space (or raise the limit) and run again, which resumes from the files already written"
        ) from None


def write_text(target: str | Path, text: str) -> None:
    """Write `text` to `target` atomically."""
    with atomic_path(target) as temp:
        temp.write_text(text, encoding="utf-8")


def write_json(target: str | Path, value) -> None:
    """Write `value` as indented JSON to `target` atomically."""
    write_text(target, json.dumps(value, indent=2, sort_keys=False) + "\n")


def fsync_dir(folder: Path) -> None:
    """Fsync `folder`, so a rename inside it survives a crash; errors are ignored."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _no_space(error: OSError) -> bool:
    if error.errno in _NO_SPACE_ERRNOS:
        return True
    # pyarrow's OSError carries the errno in its text ("Detail: [errno 28] No space left on device").
    text = str(error)
    return any(f"[errno {number}]" in text or os.strerror(number) in text for number in _NO_SPACE_ERRNOS)
