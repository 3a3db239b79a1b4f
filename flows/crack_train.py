"""The `crack-train` flow: labelled photos to an exported crack classifier.

ingest -> preprocess -> bottleneck (plan, shards mapped over the task runner, finish)
-> train -> evaluate -> export. Every task is cached by content (see `flows.caching`),
so a rerun with unchanged data skips every stage, a head-only change reruns train,
evaluate and export, and added images get features computed for them alone.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger, task, unmapped
from prefect.task_runners import ThreadPoolTaskRunner

import logging

from crackjax import registry, stages
from crackjax.engines import check_engine_options
from crackjax.errors import CrackjaxError
from crackjax.ingest import folder_fingerprint
from crackjax.logs import hide_user_error_tracebacks
from flows import artifacts
from flows.caching import locked_policy, outputs_exist, result_storage, stage_cache_policy

# Stage logs (counts, epochs, metrics) reach the flow-run log when Prefect lists
# `crackjax` in PREFECT_LOGGING_EXTRA_LOGGERS; they are INFO records.
logging.getLogger("crackjax").setLevel(logging.INFO)


def _ingest_key_inputs(parameters: dict) -> dict:
    inputs = dict(parameters)
    inputs["fingerprint"] = folder_fingerprint(parameters["assets"])
    inputs["assets"] = str(Path(parameters["assets"]).expanduser().resolve())
    return inputs


@task(name="ingest", cache_policy=stage_cache_policy("ingest", _ingest_key_inputs), persist_result=True)
def ingest(assets: str, workspace: str, options: dict) -> dict:
    return stages.ingest_stage(assets, workspace, **options)


@task(name="preprocess", cache_policy=stage_cache_policy("preprocess"), persist_result=True)
def preprocess(ingested: dict, workspace: str, input_size: int, options: dict) -> dict:
    return stages.preprocess_stage(ingested, workspace, input_size, **options)


@task(name="resolve-backbone")
def resolve_backbone(name: str | None, weights_path: str | None, compute_dtype: str, engine: str) -> dict:
    return stages.resolve_backbone_stage(name, weights_path, compute_dtype, engine)


@task(name="bottleneck-plan")
def bottleneck_plan(preprocessed: dict, backbone: dict, workspace: str, shard_size: int) -> dict:
    return stages.bottleneck_plan_stage(preprocessed, backbone, workspace, shard_size=shard_size)


@task(name="bottleneck-shard")
def bottleneck_shard(index: int, plan: dict, preprocessed: dict, backbone: dict, workspace: str, batch_size: int) -> int:
    return stages.bottleneck_shard_stage(plan, index, preprocessed, backbone, workspace, batch_size=batch_size)


@task(name="bottleneck-finish")
def bottleneck_finish(plan: dict, computed: list[int], seconds: float, preprocessed: dict, backbone: dict, workspace: str) -> dict:
    return stages.bottleneck_finish_stage(plan, computed, seconds, preprocessed, backbone, workspace)


@task(name="train", cache_policy=stage_cache_policy("train"), persist_result=True)
def train(preprocessed: dict, features: dict, head_config: dict, workspace: str) -> dict:
    return stages.train_stage(preprocessed, features, head_config, workspace)


@task(name="evaluate", cache_policy=stage_cache_policy("evaluate"), persist_result=True)
def evaluate(preprocessed: dict, features: dict, trained: dict) -> dict:
    return stages.evaluate_stage(preprocessed, features, trained)


@task(name="export", cache_policy=stage_cache_policy("export"), persist_result=True)
def export(workspace: str, preprocessed: dict, backbone: dict, features: dict, trained: dict, evaluated: dict) -> dict:
    return stages.export_stage(workspace, preprocessed=preprocessed, backbone=backbone, features=features, trained=trained, evaluated=evaluated)


@task(name="register")
def register(workspace: str, exported: dict, preprocessed: dict, features: dict, backbone: dict, promote: str, rule: dict) -> dict:
    """Add the exported model to the registry; it becomes champion only if it is not worse (see `crackjax.registry`)."""
    from prefect.runtime import flow_run

    from crackjax.versioning import code_digest

    validation = registry.validation_set(preprocessed, features, backbone)
    lineage = {"code_version": code_digest("crackjax"), "flow_run_id": str(flow_run.id) if flow_run.id else None}
    return registry.register_model(workspace, exported["model_dir"], validation, rule=registry.PromotionRule(**rule), promote=promote, lineage=lineage)


@task(name="report")
def report(exported: dict, registered: dict) -> str:
    """Publish the run's metrics, confusion matrix, curves and registry decision as Prefect artifacts."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    metrics = artifacts.load_metrics(exported["model_dir"])
    curves = artifacts.draw_curves(artifacts.load_history(exported["model_dir"]), Path(exported["model_dir"]) / artifacts.CURVES_NAME)
    create_markdown_artifact(artifacts.metrics_markdown(metrics), key="crack-train-metrics", description=f"metrics of model {exported['model_id']}")
    create_table_artifact(artifacts.confusion_rows(metrics["test"]), key="crack-train-confusion-matrix", description="test confusion matrix (rows: true label)")
    return str(create_markdown_artifact(artifacts.model_markdown(exported, registered, curves), key="crack-train-model", description=f"model version {registered['version']}: {registered['status']}"))


def _run_cached(task_function, storage, *args):
    """Run a cached task; if the outputs its cached result names were deleted, run it again."""
    policy = locked_policy(task_function.cache_policy, storage)
    result = task_function.with_options(result_storage=storage, cache_policy=policy)(*args)
    if isinstance(result, dict) and not (outputs_exist(result) and (task_function is not preprocess or stages.pixels_complete(result))):
        get_run_logger().warning("%s: cached outputs are missing from the workspace; running the stage again", task_function.name)
        result = task_function.with_options(result_storage=storage, cache_policy=policy, refresh_cache=True)(*args)
    return result


@flow(name="crack-train", task_runner=ThreadPoolTaskRunner(max_workers=1))
def crack_train(
    assets: str = "assets",
    workspace: str = "workspace",
    backbone: str | None = None,
    weights: str | None = None,
    compute_dtype: str = "float32",
    engine: str = "auto",
    label_from: str = "folder",
    prefix_separator: str = "_",
    train_fraction: float = 0.7,
    validation_fraction: float = 0.9,
    split_seed: int = 0,
    strict: bool = False,
    max_rejected_fraction: float = 0.1,
    bottleneck_batch_size: int = 32,
    shard_size: int = 512,
    head: dict | None = None,
    promote: str = "auto",
    promotion_metric: str = "accuracy",
    promotion_tolerance: float = 0.0,
) -> dict:
    """Train a crack classifier on the labelled images under `assets` and export it into `workspace/models`.

    `backbone` None means the default ResNet-v2-101, with a fallback to
    EfficientNet-Lite0 when its weights are missing. `engine` "auto" runs the
    bottleneck on ONNX Runtime when it is faster on this machine and its features
    match XLA's (see `crackjax.engines`); "xla" or "onnxruntime" forces one. `head`
    contains head options by the names of `crackjax.head.HeadConfig` (epochs,
    learning_rate, schedule, ...).

    The exported model is registered as a new version in `workspace/models/registry.json`.
    `promote` "auto" makes it the champion only when its validation `promotion_metric`
    (accuracy, macro_f1 or loss) is not worse than the champion's on the same
    validation images by more than `promotion_tolerance`; "force" promotes it anyway
    and "never" only registers it. Relative paths resolve against the working directory.
    """
    from crackjax.head_config import HeadConfig

    # Flow runs started by a worker never pass through the command line, so the
    # traceback filter for input problems is attached here too.
    hide_user_error_tracebacks()
    logger = get_run_logger()
    workspace = str(Path(workspace).expanduser().resolve())
    storage = result_storage(workspace)
    head_config = HeadConfig(**(head or {})).to_dict()
    rule = registry.PromotionRule(promotion_metric, promotion_tolerance).to_dict()
    if promote not in registry.PROMOTE_MODES:
        raise CrackjaxError(f"promote {promote!r} is unknown; use one of {', '.join(registry.PROMOTE_MODES)}")
    check_engine_options(engine, compute_dtype)

    ingested = _run_cached(ingest, storage, assets, workspace, {
        "label_from": label_from, "prefix_separator": prefix_separator, "train_fraction": train_fraction,
        "validation_fraction": validation_fraction, "seed": split_seed, "strict": strict,
    })
    resolved = resolve_backbone(backbone, weights, compute_dtype, engine)
    preprocessed = _run_cached(preprocess, storage, ingested, workspace, resolved["input_size"], {
        "strict": strict, "max_rejected_fraction": max_rejected_fraction,
    })

    started = time.perf_counter()
    plan = bottleneck_plan(preprocessed, resolved, workspace, shard_size)
    futures = bottleneck_shard.map(
        list(range(plan["shards"])), unmapped(plan), unmapped(preprocessed), unmapped(resolved), unmapped(workspace), unmapped(bottleneck_batch_size)
    )
    computed = [future.result() for future in futures]
    features = bottleneck_finish(plan, computed, time.perf_counter() - started, preprocessed, resolved, workspace)

    trained = _run_cached(train, storage, preprocessed, features, head_config, workspace)
    evaluated = _run_cached(evaluate, storage, preprocessed, features, trained)
    exported = _run_cached(export, storage, workspace, preprocessed, resolved, features, trained, evaluated)

    registered = register(workspace, exported, preprocessed, features, resolved, promote, rule)
    report(exported, registered)

    logger.info(
        "crack-train: model %s (version %d, %s) in %s; champion %s",
        exported["model_id"], registered["version"], registered["status"], exported["model_dir"], registered["champion"],
    )
    return {
        "model_dir": exported["model_dir"],
        "model_id": exported["model_id"],
        "backbone": resolved["name"],
        "fallback_reason": resolved["fallback_reason"],
        "validation_accuracy": evaluated["validation_accuracy"],
        "test_accuracy": evaluated["test_accuracy"],
        "test_table": evaluated["test_table"],
        "features_computed": features["computed"],
        "features_cached": features["cached"],
        "model_version": registered["version"],
        "promotion": registered["status"],
        "promotion_reason": registered["reason"],
        "champion": registered["champion"],
    }
