"""File digests: the one chunked reader behind image keys, store parts, checkpoints and weights files."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK_SIZE = 1 << 20


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Return the hex digest of the bytes of the file at `path` in `algorithm` ("sha256" or "md5"), read 1 MiB at a time."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()
