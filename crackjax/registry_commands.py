"""The `crackjax models list`, `crackjax models show VERSION` and `crackjax models promote VERSION` commands."""

from __future__ import annotations

import argparse
import json

from crackjax import registry

EXIT_OK = 0


def add_models_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `models` command with `list`, `show` and `promote` to `subparsers`; return its parser.

    Each subcommand sets `args.func`, which takes the parsed arguments and returns the exit code.
    """
    models = subparsers.add_parser("models", help="list the model versions of a workspace and choose the champion")
    commands = models.add_subparsers(dest="models_command", metavar="COMMAND", required=True)

    list_parser = commands.add_parser("list", help="list registered model versions, their metrics, lineage and decisions")
    list_parser.add_argument("--workspace", default="workspace", help="workspace folder (default %(default)s)")
    list_parser.add_argument("--json", action="store_true", help="print the registry entries as JSON")
    list_parser.set_defaults(func=run_list)

    show = commands.add_parser("show", help="print one version's registry entry as JSON")
    show.add_argument("version", help="version number (3 or v3), model id, or `champion`")
    show.add_argument("--workspace", default="workspace", help="workspace folder (default %(default)s)")
    show.set_defaults(func=run_show)

    promote = commands.add_parser("promote", help="make a version the champion that predict uses by default")
    promote.add_argument("version", help="version number (3 or v3) or model id")
    promote.add_argument("--workspace", default="workspace", help="workspace folder (default %(default)s)")
    promote.add_argument("--reason", default="promoted by hand", help="reason recorded in the registry events (default %(default)r)")
    promote.set_defaults(func=run_promote)
    return models


def _status(row: dict) -> str:
    if row["champion"]:
        return "champion"
    if row["decision"] == "promoted":
        return "superseded"
    return row["decision"]


def format_versions(rows: list[dict]) -> str:
    """Render registry rows as a text table, one line per version."""
    header = ("version", "model id", "status", "val acc", "val F1", "val loss", "backbone", "data", "parent", "registered")
    lines = []
    for row in rows:
        metrics = row.get("metrics") or {}
        lineage = row.get("lineage") or {}
        lines.append((
            "-" if row["version"] is None else str(row["version"]),
            row["model_id"],
            _status(row),
            _number(metrics.get("accuracy")),
            _number(metrics.get("macro_f1")),
            _number(metrics.get("loss")),
            lineage.get("backbone") or "-",
            (lineage.get("data_digest") or "-")[:8],
            lineage.get("parent") or "-",
            row.get("registered_at") or "-",
        ))
    widths = [max(len(header[index]), *(len(line[index]) for line in lines)) for index in range(len(header))]
    rendered = ["  ".join(value.ljust(width) for value, width in zip(line, widths)).rstrip() for line in [header, *lines]]
    return "\n".join(rendered)


def _number(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def run_list(args: argparse.Namespace) -> int:
    rows = registry.list_versions(args.workspace)
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print(f"no models in {registry.registry_path(args.workspace).parent}; run `crackjax train` first")
        return EXIT_OK
    print(format_versions(rows))
    for row in rows:
        if row["decision"] == "rejected":
            print(f"version {row['version']} rejected: {row['reason']}")
    return EXIT_OK


def run_show(args: argparse.Namespace) -> int:
    print(json.dumps(registry.get_version(args.workspace, args.version), indent=2))
    return EXIT_OK


def run_promote(args: argparse.Namespace) -> int:
    version = registry.promote_version(args.workspace, args.version, reason=args.reason)
    print(f"version {version['version']} ({version['model_id']}) is now the champion of {args.workspace}")
    return EXIT_OK
