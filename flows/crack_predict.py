"""The `crack-predict` flow: classify an image, or every image of a folder, with a registered model."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task

from crackjax import registry
from crackjax.logs import hide_user_error_tracebacks


@task(name="predict")
def predict(target: str, model_dir: str, weights: str | None) -> list[dict]:
    """Classify `target` (an image file or a folder) with the model in `model_dir`."""
    from crackjax.predict import Predictor, predict_path

    predictor = Predictor(model_dir, weights_path=weights)
    return [prediction.to_dict() for prediction in predict_path(predictor, target)]


@flow(name="crack-predict")
def crack_predict(
    path: str,
    workspace: str = "workspace",
    model: str = "champion",
    weights: str | None = None,
    output: str | None = None,
) -> dict:
    """Classify the image `path`, or every image under the folder `path`, as cracked or uncracked.

    `model` is "champion" (the registry's champion, or the newest model when nothing is
    registered), a version number, a model id, or a model folder. `output` names a JSON
    file to write the result to. Relative paths resolve against the working directory.

    Returns `model_id`, `model_version`, `model_dir` and `predictions` (path, label,
    probability, probabilities per label, error); for a single image also its
    `label` and `probability`.
    """
    from prefect.artifacts import create_table_artifact

    hide_user_error_tracebacks()
    logger = get_run_logger()
    model_dir = registry.resolve_model(workspace, model)
    version = registry.version_of(workspace, model_dir)
    predictions = predict(path, str(model_dir), weights)

    result = {"model_id": model_dir.name, "model_version": version, "model_dir": str(model_dir.resolve()), "predictions": predictions}
    if Path(path).expanduser().is_file():
        result["label"] = predictions[0]["label"]
        result["probability"] = predictions[0]["probability"]

    for item in predictions:
        if item["error"]:
            logger.warning("crack-predict: %s: %s", item["path"], item["error"])
        else:
            logger.info("crack-predict: %s: %s (probability %.4f), model %s version %s", item["path"], item["label"], item["probability"], model_dir.name, version)
    rows = [{"path": item["path"], "label": item["label"], "probability": item["probability"], "error": item["error"]} for item in predictions]
    create_table_artifact(rows, key="crack-predict", description=f"predictions of model {model_dir.name} (version {version})")

    if output:
        from crackjax.atomic import write_json

        write_json(output, result)
        logger.info("crack-predict: %d predictions written to %s", len(predictions), output)
    return result
