"""Ingest: find labelled images in a folder, hash them and split them by class.

Labels come from the first sub-folder under the root (`assets/CD/x.jpg` is `CD`), or
from a file-name prefix (`CD_x.jpg` is `CD` with separator `_`). The split is
deterministic for a seed and stratified: per class, images are ordered by a keyed
hash of their content, the first `train_fraction` go to train and the rest is cut
`validation_fraction` / remainder into validation and test (70/30, then 90/10 of the
30 by default, as in the ML.NET tutorial).
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import hashlib
import logging
import os
import warnings
from pathlib import Path

import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from crackjax.digests import file_digest
from crackjax.errors import DatasetError, ImageError
from crackjax.images import MAX_IMAGE_PIXELS, image_extensions

log = logging.getLogger(__name__)

LABEL_FROM_FOLDER = "folder"
LABEL_FROM_PREFIX = "prefix"
SPLITS = ("train", "validation", "test")

# Files that operating systems and tools leave beside images.
_IGNORED_NAMES = frozenset({"Thumbs.db", "desktop.ini", "README", "README.md", "README.txt", "LICENSE"})

DATASET_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("label", pa.string()),
        ("label_id", pa.int32()),
        ("split", pa.string()),
        ("sha256", pa.string()),
        ("size_bytes", pa.int64()),
    ]
)


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """One image file: `path` is relative to the scanned root, in POSIX form."""

    path: str
    label: str
    sha256: str
    size_bytes: int


# Kinds of rejected files. Only `unreadable` files count against --max-rejected-fraction:
# an unsupported file type (such as annotation `.xml` beside each image), a duplicate
# or a stray file outside the label folders is reported but is no sign of damaged data.
UNREADABLE = "unreadable"
UNSUPPORTED = "unsupported"
DUPLICATE = "duplicate"
CONFLICT = "conflict"
UNLABELLED = "unlabelled"
LINK = "link"


@dataclasses.dataclass(frozen=True)
class RejectedFile:
    """A file left out of the dataset, with the reason and the fix; `kind` is one of the kinds above."""

    path: str
    reason: str
    kind: str = UNREADABLE


@dataclasses.dataclass
class ScanResult:
    """The result of `scan_folder`: image records, rejected files and the count of ignored files."""

    root: Path
    records: list[ImageRecord]
    rejected: list[RejectedFile]
    hidden_skipped: int


def label_from_prefix(file_name: str, separator: str) -> str | None:
    """Return the label prefix of `file_name` (`"CD_7001-1.jpg"` -> `"CD"` for `_`), or None."""
    stem = Path(file_name).stem
    if separator not in stem:
        return None
    prefix = stem.split(separator, 1)[0]
    return prefix or None


def iter_files(root: Path, rejected: list[RejectedFile]) -> tuple[list[Path], int]:
    """Walk `root`, following symbolic links once, and return its visible files and the hidden count.

    A symbolic link that leads back into a folder already walked (a loop) is recorded
    in `rejected` and not followed again.
    """
    files: list[Path] = []
    hidden = 0
    visited: set[str] = set()
    for folder, dir_names, file_names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in visited:
            rejected.append(
                RejectedFile(
                    _relative(Path(folder), root),
                    f"symbolic link to {real}, a folder already scanned (a link loop or a second link to it); remove the link",
                    LINK,
                )
            )
            dir_names[:] = []
            continue
        visited.add(real)

        hidden += sum(1 for name in dir_names if name.startswith("."))
        dir_names[:] = sorted(name for name in dir_names if not name.startswith("."))
        for name in sorted(file_names):
            if name.startswith(".") or name in _IGNORED_NAMES:
                hidden += 1
                continue
            files.append(Path(folder) / name)
    return files, hidden


def scan_folder(
    root: str | Path,
    *,
    label_from: str = LABEL_FROM_FOLDER,
    prefix_separator: str = "_",
    strict: bool = False,
) -> ScanResult:
    """Find the labelled images under `root` and hash each one.

    Hidden files (`.DS_Store`, `._x.jpg`) are skipped. Files that cannot be images
    (unknown extension, empty, unidentifiable, over the pixel limit) are recorded as
    rejected with a reason. With `strict=True` the first one raises ImageError.
    Identical bytes under one label are kept once; identical bytes under two labels
    are a label conflict, and every copy is rejected.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"image folder {root} not found; pass the folder that contains one sub-folder per label")
    if label_from not in (LABEL_FROM_FOLDER, LABEL_FROM_PREFIX):
        raise ValueError(f"label_from must be {LABEL_FROM_FOLDER!r} or {LABEL_FROM_PREFIX!r}, not {label_from!r}")

    rejected: list[RejectedFile] = []
    files, hidden = iter_files(root, rejected)
    extensions = image_extensions()
    candidates: list[ImageRecord] = []

    for path in files:
        relative = _relative(path, root)
        label = _label_for(path, root, label_from, prefix_separator)
        problem = None
        kind = UNREADABLE
        if label is None:
            kind = UNLABELLED
            if label_from == LABEL_FROM_FOLDER:
                problem = "not inside a label folder; move it into a sub-folder named after its label"
            else:
                problem = f"file name has no label prefix before {prefix_separator!r}; rename it like LABEL{prefix_separator}name.jpg"
        elif path.suffix.lower() not in extensions:
            kind = UNSUPPORTED
            problem = f"unsupported file type {path.suffix or '(no extension)'!r}; crackjax reads the image formats Pillow decodes, such as JPEG and PNG"
        else:
            problem = _header_problem(path)

        if problem is not None:
            if strict:
                raise ImageError(path, f"{problem} (--strict stops at the first rejected file; without it such files are skipped)")
            rejected.append(RejectedFile(relative, problem, kind))
            continue
        candidates.append(ImageRecord(relative, label, file_digest(path), path.stat().st_size))

    records = _resolve_duplicates(candidates, rejected, strict)
    if label_from == LABEL_FROM_FOLDER:
        _check_label_folders(root, records, rejected)
    return ScanResult(root=root, records=records, rejected=rejected, hidden_skipped=hidden)


def label_folders(root: Path) -> list[str]:
    """Return the names of the visible sub-folders of `root` (symbolic links followed), sorted."""
    return sorted(entry.name for entry in root.iterdir() if not entry.name.startswith(".") and entry.is_dir())


def _check_label_folders(root: Path, records: list[ImageRecord], rejected: list[RejectedFile]) -> None:
    """Raise DatasetError when a label folder under `root` has no usable image."""
    counts = collections.Counter(record.label for record in records)
    for label in label_folders(root):
        if counts[label]:
            continue
        inside = [item for item in rejected if item.path == label or item.path.startswith(label + "/")]
        if inside:
            examples = "; ".join(f"{item.path}: {item.reason}" for item in inside[:3])
            detail = f"all {len(inside)} of its files were rejected (such as {examples})"
        else:
            detail = "it contains no image files"
        raise DatasetError(
            f"label folder {root / label} has no usable images: {detail}; add readable images to it or remove the folder",
            rejected,
        )


def split_records(
    records: list[ImageRecord],
    *,
    train_fraction: float = 0.7,
    validation_fraction: float = 0.9,
    seed: int = 0,
) -> list[tuple[ImageRecord, str]]:
    """Assign each record to `train`, `validation` or `test`, stratified by label.

    `validation_fraction` is the share of the images left after train that go to
    validation; the rest go to test. Raises DatasetError when there are fewer than two
    labels or a label has too few images to give every split at least one.
    """
    if not 0.0 < train_fraction < 1.0:
        raise DatasetError(f"train fraction {train_fraction} is invalid; use a value strictly between 0 and 1")
    if not 0.0 < validation_fraction < 1.0:
        raise DatasetError(f"validation fraction {validation_fraction} is invalid; use a value strictly between 0 and 1")

    by_label: dict[str, list[ImageRecord]] = collections.defaultdict(list)
    for record in records:
        by_label[record.label].append(record)
    check_labels(by_label)

    assigned: list[tuple[ImageRecord, str]] = []
    for label in sorted(by_label):
        ordered = sorted(by_label[label], key=lambda record: _split_rank(record.sha256, seed))
        count = len(ordered)
        train_count = round(count * train_fraction)
        validation_count = round((count - train_count) * validation_fraction)
        test_count = count - train_count - validation_count
        if min(train_count, validation_count, test_count) < 1:
            raise DatasetError(
                f"label {label!r} has {count} images, too few to split {train_count} train / "
                f"{validation_count} validation / {test_count} test; add images to {label!r} "
                f"or change the train and validation fractions"
            )
        for index, record in enumerate(ordered):
            if index < train_count:
                split = "train"
            elif index < train_count + validation_count:
                split = "validation"
            else:
                split = "test"
            assigned.append((record, split))
    return assigned


def check_labels(by_label: dict[str, list]) -> None:
    """Raise DatasetError unless there are at least two labels, each with an image."""
    if not by_label:
        raise DatasetError("no images found; put images in one sub-folder per label, such as assets/CD and assets/UD")
    if len(by_label) < 2:
        only = next(iter(by_label))
        raise DatasetError(f"only one label found ({only!r}); a classifier needs at least two, so add a folder of images for another label")
    empty = sorted(label for label, items in by_label.items() if not items)
    if empty:
        raise DatasetError(f"label folder {empty[0]!r} has no usable images; add images or remove the folder")


def dataset_table(assigned: list[tuple[ImageRecord, str]]) -> pa.Table:
    """Build the dataset table (`DATASET_SCHEMA`), rows sorted by path, label ids by sorted label."""
    labels = sorted({record.label for record, _ in assigned})
    label_ids = {label: index for index, label in enumerate(labels)}
    rows = sorted(assigned, key=lambda item: item[0].path)
    return pa.table(
        {
            "path": [record.path for record, _ in rows],
            "label": [record.label for record, _ in rows],
            "label_id": [label_ids[record.label] for record, _ in rows],
            "split": [split for _, split in rows],
            "sha256": [record.sha256 for record, _ in rows],
            "size_bytes": [record.size_bytes for record, _ in rows],
        },
        schema=DATASET_SCHEMA,
    )


def dataset_digest(table: pa.Table) -> str:
    """Return a sha256 over the dataset's paths, labels, splits and image hashes."""
    digest = hashlib.sha256()
    for path, label, split, sha in zip(
        table["path"].to_pylist(), table["label"].to_pylist(), table["split"].to_pylist(), table["sha256"].to_pylist()
    ):
        digest.update(f"{path}\0{label}\0{split}\0{sha}\n".encode())
    return digest.hexdigest()


def folder_fingerprint(root: str | Path) -> str:
    """Return a sha256 over every file's relative path, size and modification time under `root`.

    It changes whenever a file is added, removed, replaced or touched, without reading
    file contents, so it can key a cache of the ingest stage.
    """
    root = Path(root).expanduser()
    digest = hashlib.sha256()
    for folder, dir_names, file_names in os.walk(root, followlinks=True):
        dir_names.sort()
        for name in sorted(file_names):
            path = Path(folder) / name
            try:
                stat = path.stat()
            except OSError:
                continue
            digest.update(f"{_relative(path, root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _split_rank(sha256: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{sha256}".encode()).hexdigest()


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _label_for(path: Path, root: Path, label_from: str, separator: str) -> str | None:
    parts = path.relative_to(root).parts
    if label_from == LABEL_FROM_FOLDER:
        return parts[0] if len(parts) >= 2 else None
    return label_from_prefix(path.name, separator)


def _header_problem(path: Path) -> str | None:
    """Return why the file cannot be an image, reading only its header, or None."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        if path.is_symlink():
            return f"broken symbolic link to {os.readlink(path)}; fix or remove the link"
        return "file not found; it was moved or deleted during the scan"
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "symbolic link loop (the link points back to itself); fix or remove the link"
        return f"cannot read file ({error.strerror}); check its permissions"
    if size == 0:
        return "empty file (0 bytes); the upload or copy was probably interrupted, so copy it again"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                frames = getattr(image, "n_frames", 1)
    except UnidentifiedImageError:
        return "not an image Pillow can identify; the content does not match its extension, so convert it or remove it"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return f"image is over the limit of {MAX_IMAGE_PIXELS:,} pixels; downscale it first"
    except PermissionError:
        return "permission denied; make the file readable or remove it"
    except Exception as error:  # noqa: BLE001
        # Pillow raises OSError, SyntaxError or ValueError for most broken headers and a
        # few other types for some; a broken file is rejected, never a crash.
        return f"cannot read image header ({type(error).__name__}: {error}); replace or remove the file"
    if width * height > MAX_IMAGE_PIXELS:
        return f"image is {width}x{height} = {width * height:,} pixels, over the limit of {MAX_IMAGE_PIXELS:,}; downscale it first"
    if frames > 1:
        return f"animated image with {frames} frames; export one frame as JPEG or PNG"
    return None


def _resolve_duplicates(candidates: list[ImageRecord], rejected: list[RejectedFile], strict: bool) -> list[ImageRecord]:
    by_hash: dict[str, list[ImageRecord]] = collections.defaultdict(list)
    for record in candidates:
        by_hash[record.sha256].append(record)

    kept: list[ImageRecord] = []
    for copies in by_hash.values():
        labels = sorted({record.label for record in copies})
        if len(labels) > 1:
            paths = ", ".join(record.path for record in copies)
            reason = f"label conflict: the same image bytes are labelled {' and '.join(labels)} ({paths}); keep it under one label"
            if strict:
                raise DatasetError(reason, rejected)
            rejected.extend(RejectedFile(record.path, reason, CONFLICT) for record in copies)
            continue
        first, *others = sorted(copies, key=lambda record: record.path)
        kept.append(first)
        for other in others:
            log.info("ingest: %s is a duplicate of %s and is used once", other.path, first.path)
            rejected.append(RejectedFile(other.path, f"duplicate of {first.path}; the image is used once", DUPLICATE))
    return sorted(kept, key=lambda record: record.path)
