"""Content-keyed Parquet stores for preprocessed pixels and bottleneck features.

A store is a folder of immutable part files `part-<digest>.parquet`, each holding rows
keyed by the sha256 of an image file. Parts are written atomically (temporary file,
fsync, rename) with Parquet page checksums, so a killed writer leaves either a whole
part or none. A part that fails to open or fails its checksums is moved aside as
`*.corrupt` and its rows count as missing, to be recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from crackjax.atomic import TEMP_PREFIX, atomic_path, write_json

log = logging.getLogger(__name__)

KEY_COLUMN = "sha256"
ROW_GROUP_SIZE = 64


class CorruptPartError(Exception):
    """A part file failed validation while being read; it has been moved aside."""


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
        """Return the keys of every valid part, quarantining parts that fail to read."""
        keys: set[str] = set()
        for path in self.part_paths():
            try:
                column = _open(path).read(columns=[KEY_COLUMN]).column(KEY_COLUMN)
            except (OSError, pa.ArrowException) as error:
                self.quarantine(path, error)
                continue
            keys.update(column.to_pylist())
        return keys

    def write_part(self, table: pa.Table) -> Path:
        """Write `table` as a new part named by the digest of its keys; return its path."""
        keys = table.column(KEY_COLUMN).to_pylist()
        name = "part-" + hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:32] + ".parquet"
        target = self.folder / name
        with atomic_path(target) as temp:
            pq.write_table(table, temp, row_group_size=ROW_GROUP_SIZE, write_page_checksum=True, compression="zstd")
        return target

    def iter_batches(self, wanted: set[str] | None, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        """Yield record batches whose keys are in `wanted` (all rows when None), one row group at a time.

        Memory is bounded by a row group, not the store. Raises CorruptPartError after
        moving aside a part that fails its checksums.
        """
        wanted_array = pa.array(sorted(wanted), pa.string()) if wanted is not None else None
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
                    if batch.num_rows:
                        yield from batch.to_batches()
            except (OSError, pa.ArrowException) as error:
                self.quarantine(path, error)
                raise CorruptPartError(f"{path} failed validation ({error}); it was moved aside and will be recomputed") from None

    def quarantine(self, path: Path, error: Exception) -> None:
        """Move a part that failed validation aside as `*.corrupt`, so its rows count as missing."""
        target = path.with_name(path.name + ".corrupt")
        log.warning("store: %s failed validation (%s); moved to %s, its rows will be recomputed", path, error, target.name)
        path.replace(target)


def _open(path: Path) -> pq.ParquetFile:
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
