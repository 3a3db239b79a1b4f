"""Preprocess: decode and resize each image once, into a content-keyed Parquet pixel store.

Rows are keyed by the sha256 of the image file, so an image is decoded once per input
size however often it is renamed, relabelled or re-split. The dataset table (path,
label, label_id, split, sha256) lies beside the store in each run's folder.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from crackjax.errors import DatasetError, ImageError
from crackjax.images import RESIZE_METHOD, load_image
from crackjax.ingest import UNREADABLE, RejectedFile, check_labels
from crackjax.store import PartStore, chunked, digest_of

log = logging.getLogger(__name__)

PREPROCESS_VERSION = 1


@dataclasses.dataclass
class PreprocessResult:
    """The result of `preprocess_images`: the usable rows, the store, counts and rejected files."""

    table: pa.Table
    store_folder: Path
    preprocess_key: str
    cached: int
    computed: int
    rejected: list[RejectedFile]
    seconds: float


def preprocess_key(input_size: int) -> str:
    """Return the cache key of decoded pixels at `input_size`, changed by any change to decoding."""
    return digest_of({"input_size": input_size, "resize": RESIZE_METHOD, "version": PREPROCESS_VERSION})[:16]


def pixel_store(workspace: str | Path, input_size: int) -> PartStore:
    """Open the pixel store of `workspace` for images decoded at `input_size`."""
    key = preprocess_key(input_size)
    description = {"kind": "pixels", "input_size": input_size, "resize": RESIZE_METHOD, "version": PREPROCESS_VERSION}
    return PartStore(Path(workspace) / "pixels" / f"{input_size}px-{key}", description)


def pixel_schema(input_size: int) -> pa.Schema:
    """Return the pixel store schema: `sha256` and `(input_size, input_size, 3) uint8` pixels as bytes."""
    return pa.schema([("sha256", pa.string()), ("pixels", pa.binary(input_size * input_size * 3))])


def decode_shard(root: str | Path, items: list[tuple[str, str]], input_size: int, *, strict: bool = False, workers: int | None = None) -> tuple[pa.Table, list[RejectedFile]]:
    """Decode `items` (`(sha256, relative path)` pairs) under `root` into a pixel table.

    Decoding runs on a thread pool because Pillow releases the GIL while it decodes.
    Files that fail are returned as rejected, or raise ImageError when `strict`.
    """
    root = Path(root)
    workers = workers or min(8, os.cpu_count() or 1)

    def decode(item: tuple[str, str]):
        sha256, relative = item
        try:
            return sha256, load_image(root / relative, input_size).tobytes(), None
        except ImageError as error:
            return sha256, None, RejectedFile(relative, error.reason)

    keys: list[str] = []
    pixels: list[bytes] = []
    rejected: list[RejectedFile] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        for sha256, data, problem in pool.map(decode, items):
            if problem is not None:
                if strict:
                    raise ImageError(root / problem.path, f"{problem.reason} (--strict stops at the first unreadable file; without it such files are skipped)")
                rejected.append(problem)
                continue
            keys.append(sha256)
            pixels.append(data)
    table = pa.table({"sha256": keys, "pixels": pixels}, schema=pixel_schema(input_size))
    return table, rejected


def plan_preprocess(table: pa.Table, store: PartStore, shard_size: int = 256) -> tuple[list[list[tuple[str, str]]], int]:
    """Return the shards of `(sha256, path)` still to decode, and how many rows are cached."""
    present = store.keys()
    missing: dict[str, str] = {}
    cached = 0
    for sha256, path in zip(table["sha256"].to_pylist(), table["path"].to_pylist()):
        if sha256 in present:
            cached += 1
        elif sha256 not in missing:
            missing[sha256] = path
    return list(chunked(sorted(missing.items()), shard_size)), cached


def preprocess_shard(root: str | Path, shard: list[tuple[str, str]], store: PartStore, input_size: int, *, strict: bool = False) -> list[RejectedFile]:
    """Decode one shard and write it as one part of `store`; return the rejected files."""
    table, rejected = decode_shard(root, shard, input_size, strict=strict)
    if table.num_rows:
        store.write_part(table)
    return rejected


def drop_rejected(
    table: pa.Table,
    rejected: list[RejectedFile],
    *,
    max_rejected_fraction: float,
    total_files: int,
    ingest_rejected: list[RejectedFile] | None = None,
) -> pa.Table:
    """Remove rejected paths from the dataset table and check what is left.

    The unreadable fraction is (unreadable files found by ingest + files that failed to
    decode) / (image files), where ingest's unsupported types, duplicates and stray
    files do not count. Without `ingest_rejected` it is decode failures / `total_files`.
    Raises DatasetError when that fraction is over `max_rejected_fraction`, or when a
    label or a split of a label is left without images.
    """
    if ingest_rejected is None:
        unreadable = list(rejected)
        image_files = total_files
    else:
        ingest_unreadable = [item for item in ingest_rejected if item.kind == UNREADABLE]
        unreadable = ingest_unreadable + list(rejected)
        image_files = table.num_rows + len(ingest_unreadable)
    everything = list(ingest_rejected or []) + list(rejected)
    if image_files and len(unreadable) / image_files > max_rejected_fraction:
        listed = "; ".join(f"{item.path}: {item.reason}" for item in unreadable[:3])
        raise DatasetError(
            f"{len(unreadable)} of {image_files} image files ({len(unreadable) / image_files:.0%}) are unreadable, over the limit of "
            f"{max_rejected_fraction:.0%}; first ones: {listed}. Fix or remove them, or raise --max-rejected-fraction",
            everything,
        )

    labels = sorted(set(table["label"].to_pylist()))
    if rejected:
        bad = pa.array(sorted({item.path for item in rejected}), pa.string())
        table = table.filter(pc.invert(pc.is_in(table["path"], value_set=bad)))

    remaining = collections.Counter(table["label"].to_pylist())
    for label in labels:
        if not remaining[label]:
            failed = [item for item in rejected if item.path.startswith(label + "/")]
            examples = "; ".join(f"{item.path}: {item.reason}" for item in failed[:2])
            raise DatasetError(
                f"label {label!r} has no readable images left: all {len(failed)} failed to decode (such as {examples}); add readable images of {label!r}",
                everything,
            )
    check_labels({label: [label] * remaining[label] for label in labels})
    for split in ("train", "validation", "test"):
        split_labels = set(table.filter(pc.equal(table["split"], split))["label"].to_pylist())
        missing = sorted(set(labels) - split_labels)
        if missing:
            raise DatasetError(
                f"after removing unreadable files, label {missing[0]!r} has no {split} images; add more images of {missing[0]!r}", everything
            )
    return table


def preprocess_images(
    root: str | Path,
    table: pa.Table,
    workspace: str | Path,
    input_size: int,
    *,
    strict: bool = False,
    shard_size: int = 256,
    max_rejected_fraction: float = 0.1,
    total_files: int | None = None,
    ingest_rejected: list[RejectedFile] | None = None,
) -> PreprocessResult:
    """Decode every image of `table` not yet in the pixel store, shard by shard.

    Returns the dataset table without the files that failed to decode. `ingest_rejected`
    (the files ingest left out) lets the --max-rejected-fraction check count files that
    ingest found unreadable too; see `drop_rejected`.
    """
    started = time.perf_counter()
    store = pixel_store(workspace, input_size)
    shards, cached = plan_preprocess(table, store, shard_size)
    rejected: list[RejectedFile] = []
    computed = 0
    for shard in shards:
        shard_rejected = preprocess_shard(root, shard, store, input_size, strict=strict)
        rejected.extend(shard_rejected)
        computed += len(shard) - len(shard_rejected)

    usable = drop_rejected(
        table, rejected, max_rejected_fraction=max_rejected_fraction, total_files=total_files or table.num_rows, ingest_rejected=ingest_rejected
    )
    seconds = time.perf_counter() - started
    log.info("preprocess: %d images, %d cached, %d decoded, %d rejected in %.1f s", table.num_rows, cached, computed, len(rejected), seconds)
    return PreprocessResult(usable, store.folder, preprocess_key(input_size), cached, computed, rejected, seconds)
