"""Prefect artifacts of a crack-train run: metrics, confusion matrix, training curves, registry decision.

The curves are drawn with Pillow into `curves.png` in the model folder. Prefect's image
artifacts take a URL, and the model folder is local, so the markdown artifact links
the PNG by its file path.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

from crackjax.atomic import atomic_path

CURVES_NAME = "curves.png"

_PANEL_WIDTH = 480
_PANEL_HEIGHT = 320
_MARGIN = 48
_TRAIN_COLOR = (31, 119, 180)
_VALIDATION_COLOR = (214, 39, 40)


def draw_curves(history: list[dict], path: str | Path) -> Path:
    """Draw per-epoch loss and accuracy (train and validation) side by side into the PNG `path`."""
    image = Image.new("RGB", (2 * _PANEL_WIDTH, _PANEL_HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    epochs = [record["epoch"] for record in history]
    panels = (("loss", "train_loss", "val_loss"), ("accuracy", "train_accuracy", "val_accuracy"))
    for index, (title, train_key, validation_key) in enumerate(panels):
        series = {"train": [record[train_key] for record in history], "validation": [record[validation_key] for record in history]}
        _draw_panel(draw, index * _PANEL_WIDTH, title, epochs, series)

    path = Path(path)
    with atomic_path(path) as temp:
        image.save(temp, format="PNG")
    return path


def _draw_panel(draw: ImageDraw.ImageDraw, left: int, title: str, epochs: list[int], series: dict[str, list[float]]) -> None:
    box = (left + _MARGIN, _MARGIN // 2 + 12, left + _PANEL_WIDTH - _MARGIN // 2, _PANEL_HEIGHT - _MARGIN)
    draw.rectangle(box, outline="black")
    draw.text((left + _MARGIN, 6), f"{title} per epoch (blue: train, red: validation)", fill="black")

    values = [value for points in series.values() for value in points]
    low, high = min(values), max(values)
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    first, last = epochs[0], max(epochs[-1], epochs[0] + 1)

    def to_pixel(epoch: float, value: float) -> tuple[float, float]:
        x = box[0] + (epoch - first) / (last - first) * (box[2] - box[0])
        y = box[3] - (value - low) / (high - low) * (box[3] - box[1])
        return x, y

    for tick in range(5):
        value = low + (high - low) * tick / 4
        _, y = to_pixel(first, value)
        draw.line((box[0] - 4, y, box[0], y), fill="black")
        draw.text((left + 4, y - 6), f"{value:.3g}", fill="black")
    draw.text((box[0], box[3] + 6), f"epoch {first}", fill="black")
    draw.text((box[2] - 60, box[3] + 6), f"epoch {epochs[-1]}", fill="black")

    for name, color in (("train", _TRAIN_COLOR), ("validation", _VALIDATION_COLOR)):
        points = [to_pixel(epoch, value) for epoch, value in zip(epochs, series[name])]
        if len(points) == 1:
            x, y = points[0]
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=color)
        else:
            draw.line(points, fill=color, width=2)


def metrics_markdown(metrics: dict) -> str:
    """Render `evaluation.json` metrics (validation and test) as a markdown table."""
    lines = ["| split | images | accuracy | macro F1 | ROC-AUC |", "|---|---|---|---|---|"]
    for split in ("validation", "test"):
        item = metrics[split]
        auc = "n/a" if item["roc_auc"] is None else f"{item['roc_auc']:.4f}"
        lines.append(f"| {split} | {item['count']} | {item['accuracy']:.4f} | {item['macro_f1']:.4f} | {auc} |")
    lines += ["", "| test label | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for label, row in metrics["test"]["per_class"].items():
        lines.append(f"| {label} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1']:.4f} | {row['support']} |")
    return "\n".join(lines)


def confusion_rows(metrics: dict) -> list[dict]:
    """Return the test confusion matrix as table rows: one per true label, one column per predicted label."""
    labels = metrics["labels"]
    return [{"true label": label, **{f"predicted {other}": count for other, count in zip(labels, row)}} for label, row in zip(labels, metrics["confusion_matrix"])]


def model_markdown(exported: dict, registered: dict, curves: Path) -> str:
    """Render the model version, its folder, the promotion decision and the curves image link."""
    rule = registered["rule"]
    metric = rule["metric"]
    champion_value = registered.get("champion_metrics") or {}
    lines = [
        f"## Model version {registered['version']}: {registered['status']}",
        "",
        f"- model id: `{exported['model_id']}`",
        f"- folder: `{exported['model_dir']}`",
        f"- champion after this run: `{registered['champion']}` (before: `{registered['previous_champion']}`)",
        f"- rule: validation {metric}, tolerance {rule['tolerance']:g}",
        f"- this model's validation {metric}: {registered['metrics'][metric]:.4f}",
    ]
    if metric in champion_value:
        lines.append(f"- previous champion's validation {metric} on the same images: {champion_value[metric]:.4f}")
    lines += [f"- decision: {registered['reason']}", "", f"![training curves]({curves.resolve().as_uri()})", "", f"Curves image: `{curves}`"]
    return "\n".join(lines)


def load_metrics(model_dir: str | Path) -> dict:
    """Return the metrics (`metrics.json`) stored in a model folder."""
    return json.loads((Path(model_dir) / "metrics.json").read_text(encoding="utf-8"))


def load_history(model_dir: str | Path) -> list[dict]:
    """Return the per-epoch training history (`history.json`) stored in a model folder."""
    return json.loads((Path(model_dir) / "history.json").read_text(encoding="utf-8"))
