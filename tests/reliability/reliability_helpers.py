"""Helpers for the reliability suite: hand-written PNG files, symlinked folders and CLI runs."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKERS = Path(__file__).with_name("workers.py")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """Return one PNG chunk: length, type, data and the CRC-32 of type and data."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png(path: Path, width: int, height: int, *, bit_depth: int, color_type: int, rows) -> None:
    """Write a PNG by hand (Pillow cannot write 16-bit RGB); `rows` yields each row's raw bytes."""
    compressor = zlib.compressobj(1)
    data = bytearray()
    for row in rows:
        data += compressor.compress(b"\x00" + row)  # filter type 0 (none) per row
    data += compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", bytes(data)) + png_chunk(b"IEND", b""))


def link_images(folder: Path, paths: list[Path]) -> None:
    """Symlink `paths` into `folder`, creating it."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in paths:
        os.symlink(path, folder / path.name)


def cli_env(tmp_path: Path) -> dict[str, str]:
    """Return an environment for a `python -m crackjax` child with its own Prefect home."""
    env = dict(os.environ)
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env.pop("PREFECT_API_URL", None)
    env["PYTHONPATH"] = str(REPO_ROOT)
    return env


def run_cli(tmp_path: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m crackjax ARGS` in a child process and return it, with text output."""
    return subprocess.run(
        [sys.executable, "-m", "crackjax", *args],
        cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True, timeout=timeout,
    )


