"""Predict: classify one image or a folder of images with an exported model."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from crackjax.errors import CrackjaxError, ImageError, ModelError
from crackjax.export import load_head_state, read_manifest
from crackjax.images import image_extensions, load_image
from crackjax.ingest import RejectedFile, iter_files

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Prediction:
    """The result for one image; `error` is set instead of a label when it could not be read."""

    path: str
    label: str | None
    probability: float | None
    probabilities: dict[str, float] | None
    true_label: str | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def head_probabilities(params: dict, mean: np.ndarray, std: np.ndarray, features: np.ndarray) -> np.ndarray:
    """Return `(n, classes) float32` softmax probabilities of an exported head, computed in NumPy.

    The same arithmetic as `crackjax.head.Head` (standardise, optional ReLU hidden
    layer, logits), without compiling a JAX program for each batch shape.
    """
    x = (np.asarray(features, np.float32) - mean) / std
    if "hidden" in params:
        x = np.maximum(x @ params["hidden"]["kernel"] + params["hidden"]["bias"], 0.0)
    logits = x @ params["logits"]["kernel"] + params["logits"]["bias"]
    logits = logits - logits.max(axis=1, keepdims=True)
    exponentials = np.exp(logits)
    return (exponentials / exponentials.sum(axis=1, keepdims=True)).astype(np.float32)


def _runnable_engine(requested: str | None, trained: str) -> str:
    """Return the engine to run: `requested`, else the one the model was trained with.

    A model trained with onnxruntime runs with xla when onnxruntime cannot be
    imported, because both engines give the same features within 1e-3. An explicitly
    requested onnxruntime raises ModelError instead.
    """
    from crackjax.engines import INSTALL_ONNXRUNTIME

    engine = requested or trained
    if engine != "onnxruntime":
        return engine
    try:
        # Importing, not only finding, also catches a broken installation.
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as error:
        problem = f"onnxruntime cannot be imported ({error})"
    else:
        return engine
    if requested:
        raise ModelError(f"the onnxruntime engine needs the onnx and onnxruntime packages, but {problem}; {INSTALL_ONNXRUNTIME}, or pass --engine xla")
    log.warning("predict: the model was trained with the onnxruntime engine, but %s; running the backbone with xla, whose features match within 1e-3", problem)
    return "xla"


class Predictor:
    """A loaded model: backbone with weights, head parameters and labels."""

    def __init__(self, model_dir: str | Path, *, weights_path: str | Path | None = None, batch_size: int = 16, engine: str | None = None):
        from crackjax.backbones import file_sha256, get_weights_entry, package_resolver
        from crackjax.bottleneck import load_backbone
        from crackjax.weights.download import ensure_weights

        self.model_dir = Path(model_dir)
        self.manifest = read_manifest(self.model_dir)
        self.labels: list[str] = list(self.manifest["labels"])
        self.batch_size = batch_size
        state = load_head_state(self.model_dir)
        self.params = state["params"]
        self.feature_mean = state["feature_mean"]
        self.feature_std = state["feature_std"]

        backbone = self.manifest["backbone"]
        entry = get_weights_entry(backbone["weights"])
        path = ensure_weights(entry, weights_path, download=True, package_resolver=package_resolver)
        if file_sha256(path) != backbone["weights_sha256"]:
            raise ModelError(
                f"weights file {path} has sha256 {file_sha256(path)[:12]}..., but model {self.manifest['model_id']} was trained "
                f"with {backbone['weights_sha256'][:12]}...; restore the original weights file or train a new model"
            )
        self.backbone = load_backbone(
            backbone["name"], entry.name, path, compute_dtype=backbone.get("compute_dtype", "float32"), engine=_runnable_engine(engine, backbone.get("engine", "xla"))
        )
        self.input_size = self.backbone.backbone.input_size

    @property
    def model_id(self) -> str:
        return self.manifest["model_id"]

    def predict_arrays(self, images: np.ndarray) -> np.ndarray:
        """Return `(n, classes)` probabilities for `(n, size, size, 3) uint8` images, in fixed-shape batches.

        A single image runs as a batch of one, so classifying one image does not cost
        `batch_size` forward passes. anything larger runs in batches of `batch_size`,
        the last one padded. Each of the two shapes compiles once per process.
        """
        outputs = []
        batch_size = 1 if len(images) == 1 else self.batch_size
        buffer = np.zeros((batch_size, self.input_size, self.input_size, 3), np.uint8)
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            buffer[: len(chunk)] = chunk
            buffer[len(chunk) :] = 0
            features = np.asarray(self.backbone.features(buffer))[: len(chunk)]
            outputs.append(head_probabilities(self.params, self.feature_mean, self.feature_std, features))
        if not outputs:
            return np.zeros((0, len(self.labels)), np.float32)
        return np.concatenate(outputs)

    def predict_files(self, paths: list[Path], *, root: Path | None = None) -> list[Prediction]:
        """Classify image files; unreadable files give a Prediction with `error` set."""
        results: list[Prediction] = []
        for start in range(0, len(paths), self.batch_size):
            batch_paths = paths[start : start + self.batch_size]
            arrays, readable = [], []
            for path in batch_paths:
                shown = path.relative_to(root).as_posix() if root else str(path)
                try:
                    arrays.append(load_image(path, self.input_size))
                    readable.append((path, shown))
                except ImageError as error:
                    results.append(Prediction(shown, None, None, None, self._true_label(path, root), error.reason))
            if not arrays:
                continue
            probabilities = self.predict_arrays(np.stack(arrays))
            for (path, shown), row in zip(readable, probabilities):
                best = int(row.argmax())
                results.append(
                    Prediction(
                        path=shown,
                        label=self.labels[best],
                        probability=float(row[best]),
                        probabilities={label: float(value) for label, value in zip(self.labels, row)},
                        true_label=self._true_label(path, root),
                    )
                )
        return results

    def _true_label(self, path: Path, root: Path | None) -> str | None:
        if root is None:
            return None
        parts = path.relative_to(root).parts
        if len(parts) >= 2 and parts[0] in self.labels:
            return parts[0]
        return None


def check_target(target: str | Path) -> Path:
    """Return `target` as a Path, or raise CrackjaxError when it is neither a file nor a folder.

    The command line calls this before loading the model, so a mistyped path fails at once.
    """
    target = Path(target).expanduser()
    if target.is_symlink() and not target.exists():
        raise CrackjaxError(f"{target} is a broken symbolic link to {os.readlink(target)}; pass an image file or a folder of images")
    if not target.exists():
        raise CrackjaxError(f"{target} not found; pass an image file or a folder of images")
    if not (target.is_file() or target.is_dir()):
        raise CrackjaxError(f"{target} is neither a file nor a folder; pass an image file or a folder of images")
    return target


def predict_path(predictor: Predictor, target: str | Path) -> list[Prediction]:
    """Classify the image `target`, or every image under the folder `target`.

    Raises CrackjaxError when `target` does not exist, when a single file is not a
    readable image, or when a folder contains no images.
    """
    target = check_target(target)

    if target.is_file():
        results = predictor.predict_files([target])
        if results[0].error:
            raise ImageError(target, results[0].error)
        return results

    started = time.perf_counter()
    rejected: list[RejectedFile] = []
    files, _ = iter_files(target, rejected)
    extensions = image_extensions()
    images = [path for path in files if path.suffix.lower() in extensions]
    if not images:
        raise CrackjaxError(f"no images found under {target}; crackjax reads the formats Pillow decodes, such as JPEG and PNG")
    results = predictor.predict_files(images, root=target)
    log.info("predict: %d images in %.1f s", len(results), time.perf_counter() - started)
    return results


def format_predictions(results: list[Prediction], output_format: str = "table") -> str:
    """Render predictions as a text table, JSON or CSV."""
    if output_format == "json":
        return json.dumps([result.to_dict() for result in results], indent=2)
    if output_format == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["path", "label", "probability", "true_label", "error"])
        for result in results:
            probability = "" if result.probability is None else f"{result.probability:.6f}"
            writer.writerow([result.path, result.label or "", probability, result.true_label or "", result.error or ""])
        return buffer.getvalue().rstrip("\n")

    labelled = any(result.true_label for result in results)
    width = max([len("path"), *(len(result.path) for result in results)])
    header = f"{'path':<{width}}  {'label':<10}  probability" + ("  true label" if labelled else "")
    lines = [header]
    for result in results:
        if result.error:
            lines.append(f"{result.path:<{width}}  error: {result.error}")
            continue
        line = f"{result.path:<{width}}  {result.label:<10}  {result.probability:.4f}     "
        if labelled:
            if result.true_label is None:
                mark = ""
            elif result.true_label == result.label:
                mark = " (correct)"
            else:
                mark = " (wrong)"
            line += f"  {result.true_label or '-'}{mark}"
        lines.append(line.rstrip())
    if labelled:
        scored = [result for result in results if result.true_label and result.label]
        correct = sum(result.true_label == result.label for result in scored)
        lines.append(f"{correct} of {len(scored)} labelled images correct ({correct / max(len(scored), 1):.1%})")
    return "\n".join(lines)
