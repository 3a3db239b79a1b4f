"""The `crackjax` command line: train, predict, weights."""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import os
import sys
from pathlib import Path

from crackjax import __version__
from crackjax.logs import USER_ERRORS, configure_plain_logging, hide_user_error_tracebacks, prefect_environment

EXIT_OK = 0
EXIT_FAILED = 1


def _add_head_options(parser: argparse.ArgumentParser) -> None:
    from crackjax.head_config import CLASS_WEIGHTINGS, MONITORS, SCHEDULES, HeadConfig

    defaults = HeadConfig()
    group = parser.add_argument_group("head options")
    group.add_argument("--epochs", type=int, default=defaults.epochs, help="maximum training epochs (default %(default)s)")
    group.add_argument("--batch-size", type=int, default=defaults.batch_size, help="head training batch size in feature vectors (default %(default)s)")
    group.add_argument("--learning-rate", type=float, default=defaults.learning_rate, help="peak learning rate of the schedule (default %(default)s)")
    group.add_argument("--schedule", choices=SCHEDULES, default=defaults.schedule, help="learning-rate schedule (default %(default)s)")
    group.add_argument("--decay-rate", type=float, default=defaults.decay_rate, help="per-epoch factor of the exponential schedule (default %(default)s)")
    group.add_argument("--hidden-units", type=int, default=defaults.hidden_units, help="units of one hidden ReLU layer; 0 for a linear head (default %(default)s)")
    group.add_argument("--dropout", type=float, default=defaults.dropout, help="dropout rate after the hidden layer (default %(default)s)")
    group.add_argument("--l2", type=float, default=defaults.l2, help="L2 penalty on the weights, added to the mean loss (default %(default)s)")
    group.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="decoupled AdamW weight decay (default %(default)s)")
    group.add_argument("--standardize", action=argparse.BooleanOptionalAction, default=defaults.standardize, help="standardise features with the training mean and deviation (default %(default)s)")
    group.add_argument("--label-smoothing", type=float, default=defaults.label_smoothing, help="label smoothing of the cross-entropy loss (default %(default)s)")
    group.add_argument("--monitor", choices=MONITORS, default=defaults.monitor, help="validation metric for early stopping (default %(default)s)")
    group.add_argument("--patience", type=int, default=defaults.patience, help="epochs without improvement before stopping; 0 turns early stopping off (default %(default)s)")
    group.add_argument("--min-delta", type=float, default=defaults.min_delta, help="smallest change of the monitored metric that counts as an improvement (default %(default)s)")
    group.add_argument("--class-weighting", choices=CLASS_WEIGHTINGS, default=defaults.class_weighting, help="loss weights per class against imbalance (default %(default)s)")
    group.add_argument("--seed", type=int, default=defaults.seed, help="seed of head initialisation and shuffling (default %(default)s)")


def _head_options(args: argparse.Namespace) -> dict:
    from crackjax.head_config import HeadConfig

    return {field.name: getattr(args, field.name) for field in dataclasses.fields(HeadConfig)}


def _registered_weights():
    from crackjax.backbones import weights_entries

    return weights_entries().values()


def _resolve_package_weights(entry):
    from crackjax.backbones import package_resolver

    return package_resolver(entry)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crackjax", description="Label concrete photos as cracked or uncracked by transfer learning.")
    parser.add_argument("--version", action="version", version=f"crackjax {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = commands.add_parser("train", help="train a classifier on a folder of labelled images (the crack-train flow)")
    train.add_argument("assets", nargs="?", default="assets", help="image folder with one sub-folder per label (default %(default)s)")
    train.add_argument("--workspace", default="workspace", help="folder for caches and models (default %(default)s)")
    train.add_argument("--backbone", default=None, help="backbone name, as `crackjax weights list` shows (default resnet_v2_101, falling back to efficientnet_lite0 without its weights)")
    train.add_argument("--weights", default=None, help="path of the backbone's weights file, instead of the cache")
    train.add_argument(
        "--engine", choices=("auto", "xla", "onnxruntime"), default="auto",
        help="runtime of the bottleneck forward pass: xla (the jitted Flax model), onnxruntime (a graph built from the same weights, "
        "for CPU), or auto, which measures both once per machine and backbone and takes onnxruntime when it is faster and its "
        "features match (default %(default)s)",
    )
    train.add_argument(
        "--compute-dtype", choices=("float32", "bfloat16"), default="float32",
        help="dtype of the bottleneck forward pass; bfloat16 runs on the xla engine only, after its features pass a check "
        "against float32 on 8 photos of the dataset (min cosine similarity 0.999) (default %(default)s)",
    )
    train.add_argument("--label-from", choices=("folder", "prefix"), default="folder", help="take labels from sub-folder names or file-name prefixes (default %(default)s)")
    train.add_argument("--prefix-separator", default="_", help="separator after the label prefix, with --label-from prefix (default %(default)r)")
    train.add_argument("--train-fraction", type=float, default=0.7, help="share of each label for training (default %(default)s)")
    train.add_argument("--validation-fraction", type=float, default=0.9, help="share of the rest for validation; the remainder is test (default %(default)s)")
    train.add_argument("--split-seed", type=int, default=0, help="seed of the train/validation/test split (default %(default)s)")
    train.add_argument("--strict", action="store_true", help="fail on the first unreadable file instead of skipping it")
    train.add_argument("--max-rejected-fraction", type=float, default=0.1, help="fail when more than this share of files is unreadable (default %(default)s)")
    train.add_argument("--bottleneck-batch-size", type=int, default=32, help="images per bottleneck forward pass (default %(default)s)")
    train.add_argument("--shard-size", type=int, default=512, help="images per bottleneck shard task (default %(default)s)")
    train.add_argument("--dask-workers", type=int, default=0, help="run bottleneck shards on a local Dask cluster of this many worker processes")
    train.add_argument("--dask-address", default=None, help="run bottleneck shards on the Dask scheduler at this address")
    train.add_argument("--promote", choices=("auto", "force", "never"), default="auto", help="make the new model the champion: when not worse (auto), always, or never (default %(default)s)")
    train.add_argument("--promotion-metric", choices=("accuracy", "macro_f1", "loss"), default="accuracy", help="validation metric that decides promotion (default %(default)s)")
    train.add_argument("--promotion-tolerance", type=float, default=0.0, help="how much worse than the champion, in the metric's unit, still promotes (default %(default)s)")
    _add_head_options(train)
    train.set_defaults(func=run_train)

    predict = commands.add_parser("predict", help="classify an image or a folder of images")
    predict.add_argument("path", help="image file or folder")
    predict.add_argument("--model", default=None, help="model folder, model id or version number (default: the workspace's champion, or its newest model when none is registered)")
    predict.add_argument("--workspace", default="workspace", help="workspace whose champion model is used (default %(default)s)")
    predict.add_argument("--engine", choices=("xla", "onnxruntime"), default=None, help="runtime of the backbone (default: the engine the model was trained with)")
    predict.add_argument("--weights", default=None, help="path of the backbone's weights file, instead of the cache")
    output = predict.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print JSON")
    output.add_argument("--csv", action="store_true", help="print CSV")
    predict.add_argument("--output", default=None, help="write the predictions to this file instead of stdout")
    predict.set_defaults(func=run_predict)

    from crackjax.weights.commands import add_weights_commands

    # The registry imports every Flax model, so it is loaded only when a weights command runs.
    add_weights_commands(commands, _registered_weights, _resolve_package_weights)

    from crackjax.registry_commands import add_models_commands

    add_models_commands(commands)
    return parser


def check_train_options(args: argparse.Namespace) -> None:
    """Raise CrackjaxError for an invalid folder or option before the flow starts Prefect's server."""
    from crackjax.errors import CrackjaxError, DatasetError

    assets = Path(args.assets).expanduser()
    if not assets.is_dir():
        raise DatasetError(f"image folder {assets} not found; pass the folder that contains one sub-folder per label")
    if args.label_from == "folder":
        _check_label_folders(assets)
    for name in ("train_fraction", "validation_fraction"):
        value = getattr(args, name)
        if not 0.0 < value < 1.0:
            raise CrackjaxError(f"--{name.replace('_', '-')} {value} is invalid; use a value strictly between 0 and 1")
    if not 0.0 <= args.max_rejected_fraction <= 1.0:
        raise CrackjaxError(f"--max-rejected-fraction {args.max_rejected_fraction} is invalid; use a value from 0 to 1")
    from crackjax.engines import check_engine_options

    check_engine_options(args.engine, args.compute_dtype)
    for name in ("bottleneck_batch_size", "shard_size", "epochs", "batch_size"):
        value = getattr(args, name, 1)
        if value < 1:
            raise CrackjaxError(f"--{name.replace('_', '-')} {value} is invalid; use a whole number of at least 1")


def _check_label_folders(assets: Path) -> None:
    """Raise DatasetError unless `assets` has at least two label folders that contain a file.

    Only names are listed, so a folder of any size is checked in milliseconds, before
    Prefect's server starts. Whether the files are images is checked by the ingest stage.
    """
    from crackjax.errors import DatasetError

    labels = []
    for entry in sorted(os.scandir(assets), key=lambda item: item.name):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        has_file = any(not name.startswith(".") for _, _, names in os.walk(entry.path, followlinks=True) for name in names)
        if has_file:
            labels.append(entry.name)
    if not labels:
        raise DatasetError(f"no label folders with images in {assets}; put the images in one sub-folder per label, such as {assets}/CD and {assets}/UD")
    if len(labels) == 1:
        raise DatasetError(f"only one label folder with images in {assets} ({labels[0]!r}); a classifier needs at least two, so add a folder of images for another label")


def _start_temporary_server(argv: list[str]):
    """Start a temporary Prefect server for `crackjax train` when no API URL is set, before anything else loads.

    Prefect reads PREFECT_API_URL when it is imported, so the server's address is set
    before `flows.crack_train` imports it. Returns the server, or None.
    """
    if argv[:1] != ["train"] or os.environ.get("PREFECT_API_URL") or "-h" in argv or "--help" in argv:
        return None
    from crackjax.prefect_server import TemporaryServer

    server = TemporaryServer()
    # Registered before Prefect is imported, so it runs after Prefect's own exit
    # handlers have sent their last logs and events to the server.
    atexit.register(server.stop)
    os.environ["PREFECT_API_URL"] = server.api_url
    return server


def run_train(args: argparse.Namespace) -> int:
    check_train_options(args)

    from flows.crack_train import crack_train

    if args.temporary_server is not None:
        # The backbone registry imports JAX and Flax (about 1 s), which every run needs
        # for its resolve-backbone task; importing it here overlaps the server's boot.
        import crackjax.backbones  # noqa: F401

        args.temporary_server.wait_until_ready()
    hide_user_error_tracebacks()
    flow = crack_train
    if args.dask_workers or args.dask_address:
        from prefect_dask import DaskTaskRunner

        if args.dask_address:
            runner = DaskTaskRunner(address=args.dask_address)
        else:
            # The local workers share this machine's CPUs, so each worker's ONNX Runtime
            # session gets its share. This process keeps every CPU for the engine calibration.
            share = os.environ.get("CRACKJAX_ORT_THREADS") or str(max(1, (os.cpu_count() or 1) // args.dask_workers))
            runner = DaskTaskRunner(cluster_kwargs={"n_workers": args.dask_workers, "threads_per_worker": 1, "env": {"CRACKJAX_ORT_THREADS": share}})
        flow = crack_train.with_options(task_runner=runner)

    result = flow(
        assets=args.assets,
        workspace=args.workspace,
        backbone=args.backbone,
        weights=args.weights,
        compute_dtype=args.compute_dtype,
        engine=args.engine,
        label_from=args.label_from,
        prefix_separator=args.prefix_separator,
        train_fraction=args.train_fraction,
        validation_fraction=args.validation_fraction,
        split_seed=args.split_seed,
        strict=args.strict,
        max_rejected_fraction=args.max_rejected_fraction,
        bottleneck_batch_size=args.bottleneck_batch_size,
        shard_size=args.shard_size,
        head=_head_options(args),
        promote=args.promote,
        promotion_metric=args.promotion_metric,
        promotion_tolerance=args.promotion_tolerance,
    )
    print(result["test_table"])
    print(f"validation accuracy {result['validation_accuracy']:.4f}, test accuracy {result['test_accuracy']:.4f}, backbone {result['backbone']}")
    print(f"version {result['model_version']} {result['promotion']}: {result['promotion_reason']}")
    print(f"model: {result['model_dir']}")
    return EXIT_OK


def run_predict(args: argparse.Namespace) -> int:
    from crackjax.predict import Predictor, check_target, format_predictions, predict_path
    from crackjax.registry import resolve_model

    configure_plain_logging()
    check_target(args.path)
    model_dir = resolve_model(args.workspace, args.model)
    predictor = Predictor(model_dir, weights_path=args.weights, engine=args.engine)
    results = predict_path(predictor, args.path)
    output_format = "table"
    if args.json:
        output_format = "json"
    elif args.csv:
        output_format = "csv"
    text = format_predictions(results, output_format)
    if args.output:
        from crackjax.atomic import write_text

        write_text(args.output, text + "\n")
        print(f"predictions for {len(results)} images written to {args.output}", file=sys.stderr)
    else:
        print(text)
    return EXIT_FAILED if any(result.error for result in results) and len(results) == 1 else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    prefect_environment()
    server = _start_temporary_server(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.temporary_server = server
    if args.command == "predict":
        # `crackjax train` configures JAX in `load_backbone`, and only when a stage
        # computes features, so a fully cached run never imports JAX.
        from crackjax.runtime import configure_jax

        configure_jax()
    try:
        return args.func(args)
    except USER_ERRORS as error:
        print(f"crackjax: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("crackjax: interrupted; rerun the same command to resume from the cached stages", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
