"""Content-keyed Parquet stores for preprocessed pixels and bottleneck features.

A store is a folder of immutable part files `part-<keys digest>-<content digest>.parquet`,
each holding rows keyed by the sha256 of an image file. Parts are written atomically
(temporary file, fsync, rename) with Parquet page checksums, so a killed writer
leaves either a whole part or none. The content digest in the name is the sha256 of
the file's bytes, so any later change to a part (truncation, an edited byte in a page
or in the footer) is caught before it is read. A part that fails to open, fails its
digest or fails its page checksums is moved aside as `*.corrupt` and its rows count
as missing, to be recomputed.

Several processes may write one store at once: each part is complete or absent, and
when two parts hold the same key, readers use the first one in name order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from crackjax.atomic import TEMP_PREFIX, commit_file, raise_if_no_space, temporary_path, write_json
from crackjax.digests import file_digest
from crackjax.errors import CrackjaxError

log = logging.getLogger(__name__)

KEY_COLUMN = "sha256"
ROW_GROUP_SIZE = 64

# `part-<32 hex keys digest>-<32 hex content digest>.parquet`; parts written before the
# content digest was added have only the keys digest and are checked by page checksums alone.
_PART_NAME = re.compile(r"^part-(?P<keys>[0-9a-f]{32})(?:-(?P<content>[0-9a-f]{32}))?\.parquet$")


class CorruptPartError(CrackjaxError):
    """A part file failed validation while being read; it has been moved aside."""


class _DigestMismatch(Exception):
    """The bytes of a part no longer match the content digest in its name."""


def digest_of(value) -> str:
    """Return the sha256 of `value` serialised as canonical JSON."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class PartStore:
    """A folder of Parquet part files whose rows are keyed by image sha256.

    `description` (a JSON-serialisable dict) is written to `store.json` and names what
    the rows were computed from, so a reader can tell two stores apart.
    """

    def __init__(self, folder: str | Path, description: dict | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if description is not None and not (self.folder / "store.json").exists():
            write_json(self.folder / "store.json", description)

    def part_paths(self) -> list[Path]:
        """Return the part files, sorted by name; temporary and quarantined files are left out."""
        return sorted(path for path in self.folder.glob("part-*.parquet") if not path.name.startswith(TEMP_PREFIX))

    def keys(self) -> set[str]:
        """Return the keys of every valid part, quarantining parts that fail validation."""
        keys: set[str] = set()
        for path in self.part_paths():
            try:
                column = _open(path).read(columns=[KEY_COLUMN]).column(KEY_COLUMN)
            except FileNotFoundError:
                continue  # moved aside by another process since the listing
            except (OSError, pa.ArrowException, _DigestMismatch) as error:
                self.quarantine(path, error)
                continue
            keys.update(column.to_pylist())
        return keys

    def write_part(self, table: pa.Table) -> Path:
        """Write `table` as a new part named by the digests of its keys and of its bytes; return its path.

        Raises DiskFullError when the disk is full; no part is left behind then.
        """
        keys = table.column(KEY_COLUMN).to_pylist()
        keys_digest = hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:32]
        temp = temporary_path(self.folder, f"part-{keys_digest}")
        try:
            pq.write_table(table, temp, row_group_size=ROW_GROUP_SIZE, write_page_checksum=True, compression="zstd")
            target = self.folder / f"part-{keys_digest}-{file_digest(temp)[:32]}.parquet"
            commit_file(temp, target)
        except BaseException as error:
            temp.unlink(missing_ok=True)
            raise_if_no_space(error, self.folder / f"part-{keys_digest}.parquet")
            raise
        return target

    def iter_batches(self, wanted: set[str] | None, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        """Yield record batches whose keys are in `wanted` (all rows when None), one row group at a time.

        Each key is yielded once, from the first part (in name order) that contains it.
        Memory is bounded by a row group, not the store. Raises CorruptPartError after
        moving aside a part that fails validation.
        """
        if columns is not None and KEY_COLUMN not in columns:
            columns = [KEY_COLUMN, *columns]
        wanted_array = pa.array(sorted(wanted), pa.string()) if wanted is not None else None
        seen: set[str] = set()
        for path in self.part_paths():
            try:
                part = _open(path)
                if wanted is not None:
                    part_keys = part.read(columns=[KEY_COLUMN]).column(KEY_COLUMN).to_pylist()
                    if not wanted.intersection(part_keys):
                        continue
                for group in range(part.num_row_groups):
                    batch = part.read_row_group(group, columns=columns)
                    if wanted is not None:
                        batch = batch.filter(pc.is_in(batch.column(KEY_COLUMN), value_set=wanted_array))
                    batch = _drop_seen(batch, seen)
                    if batch.num_rows:
                        yield from batch.to_batches()
            except FileNotFoundError:
                continue  # moved aside by another process since the listing
            except (OSError, pa.ArrowException, _DigestMismatch) as error:
                self.quarantine(path, error)
                raise CorruptPartError(f"{path} failed validation ({error}); it was moved aside, so run again to recompute its rows") from None

    def quarantine(self, path: Path, error: Exception) -> None:
        """Move a part that failed validation aside as `*.corrupt`, so its rows count as missing."""
        target = path.with_name(path.name + ".corrupt")
        log.warning("store: %s failed validation (%s); moved to %s, its rows will be recomputed", path, error, target.name)
        try:
            path.replace(target)
        except FileNotFoundError:
            pass  # another process moved it aside first


def _drop_seen(batch: pa.Table, seen: set[str]) -> pa.Table:
    """Remove rows whose key is in `seen` (duplicates from concurrent writers) and add the rest to it."""
    keep = []
    for key in batch.column(KEY_COLUMN).to_pylist():
        keep.append(key not in seen)
        seen.add(key)
    if all(keep):
        return batch
    return batch.filter(pa.array(keep, pa.bool_()))


# Parts whose bytes matched their content digest in this process, by (path, inode, size, mtime).
_verified: set[tuple[str, int, int, int]] = set()
_verified_lock = threading.Lock()


def _verify_digest(path: Path) -> None:
    """Raise _DigestMismatch unless the bytes of `path` match the content digest in its name."""
    match = _PART_NAME.match(path.name)
    if match is None or match["content"] is None:
        return
    stat = path.stat()
    identity = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    with _verified_lock:
        if identity in _verified:
            return
    actual = file_digest(path)[:32]
    if actual != match["content"]:
        raise _DigestMismatch(f"content sha256 {actual} does not match {match['content']} in the file name; the file was changed after it was written")
    with _verified_lock:
        _verified.add(identity)


def _open(path: Path) -> pq.ParquetFile:
    _verify_digest(path)
    return pq.ParquetFile(path, page_checksum_verification=True)


def chunked(items: Iterable, size: int) -> Iterator[list]:
    """Yield lists of at most `size` items from `items`."""
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
