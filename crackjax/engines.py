"""Choosing the bottleneck engine: "auto" measures both engines once per machine and backbone.

Two engines run the same backbone variables: "xla" (the jitted Flax module) and
"onnxruntime" (`crackjax.onnx_engine`). On 2 CPU cores the onnxruntime engine ran 1.5
to 5 times faster than XLA (docs/benchmarks.md). The onnxruntime package that crackjax
installs runs on CPU only, so on GPU and TPU XLA runs. `choose_engine("auto", ...)`
decides like this:

* `xla` when the compute dtype is not float32, onnxruntime is not installed, the
  backbone has no ONNX graph builder, or JAX's default device is not a CPU;
* otherwise it calibrates: both engines run the same probe batch, the onnxruntime
  engine is chosen only when its features match XLA's within `PARITY_TOLERANCE` (max
  absolute difference) and it is faster. The figures are kept as a small JSON record
  in `cache_dir()/engines`. Its key covers the backbone, the weights file's sha256,
  the CPU, the library versions, the XLA flags, `CRACKJAX_ORT_THREADS` and the
  engines' source, so calibration runs once per machine and backbone. Deleting the
  record measures again.

An explicit "xla" or "onnxruntime" is used as given. `check_bfloat16` compares
bfloat16 features with float32 ones on photos of the dataset, since synthetic probe
images hide the difference: on EfficientNet-Lite0 they passed the check while real
deck photos reached a min cosine similarity of only 0.984.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import os
import platform
import time
from importlib.util import find_spec
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

ENGINES = ("xla", "onnxruntime")
ENGINE_CHOICES = ("auto", *ENGINES)
INSTALL_ONNXRUNTIME = "install them with `.venv/bin/pip install -c constraints.txt onnx onnxruntime`"
COMPUTE_DTYPES = ("float32", "bfloat16")
# The largest absolute difference between the engines' features that still counts as the same features.
PARITY_TOLERANCE = 1e-3
# The min cosine similarity to float32 features that bfloat16 features must keep.
BFLOAT16_MIN_COSINE = 0.999
PROBE_BATCH = 8
TIMED_RUNS = 3
CALIBRATION_VERSION = 1
# Backbone families that `crackjax.onnx_engine.build_onnx_model` can build.
ONNX_FAMILIES = ("resnet_v2_", "efficientnet_lite", "bit_")


@dataclasses.dataclass(frozen=True)
class EngineChoice:
    """The engine to run, why, and the calibration figures behind an automatic choice (or None)."""

    engine: str
    reason: str
    calibration: dict | None = None


def onnx_supported(backbone_name: str) -> bool:
    """Return whether `crackjax.onnx_engine` can build an ONNX graph of backbone `backbone_name`."""
    return backbone_name.startswith(ONNX_FAMILIES)


def check_engine_options(engine: str, compute_dtype: str) -> None:
    """Raise CrackjaxError for an unknown engine or compute dtype, or a pair that cannot run together."""
    from crackjax.errors import CrackjaxError

    if engine not in ENGINE_CHOICES:
        raise CrackjaxError(f"engine {engine!r} is invalid; use one of {', '.join(ENGINE_CHOICES)}")
    if compute_dtype not in COMPUTE_DTYPES:
        raise CrackjaxError(f"compute dtype {compute_dtype!r} is invalid; use one of {', '.join(COMPUTE_DTYPES)}")
    if engine == "onnxruntime" and compute_dtype != "float32":
        raise CrackjaxError(f"the onnxruntime engine runs float32 only, not {compute_dtype}; use --engine xla (or auto) with --compute-dtype {compute_dtype}")
    if engine == "onnxruntime" and not onnxruntime_installed():
        raise CrackjaxError(f"the onnxruntime engine needs the onnx and onnxruntime packages, which are not installed; {INSTALL_ONNXRUNTIME}, or use --engine auto")


def onnxruntime_installed() -> bool:
    """Return whether the onnx and onnxruntime packages are installed (found, not imported)."""
    return find_spec("onnxruntime") is not None and find_spec("onnx") is not None


def choose_engine(requested: str, backbone_name: str, weights_name: str, weights_path: str | Path, weights_sha256: str, compute_dtype: str = "float32") -> EngineChoice:
    """Return the engine for `requested` ("auto", "xla" or "onnxruntime"); see the module docstring.

    Raises ValueError for an unknown engine name.
    """
    if requested not in ENGINE_CHOICES:
        raise ValueError(f"engine must be one of {', '.join(ENGINE_CHOICES)}, not {requested!r}")
    if requested != "auto":
        return EngineChoice(requested, "named by the caller")
    if compute_dtype != "float32":
        return EngineChoice("xla", f"the onnxruntime engine runs float32 only, not {compute_dtype}")
    if not onnxruntime_installed():
        return EngineChoice("xla", "onnxruntime is not installed")
    if not onnx_supported(backbone_name):
        return EngineChoice("xla", f"the onnxruntime engine has no graph of {backbone_name}")

    from crackjax.runtime import configure_jax

    configure_jax()
    import jax

    device = jax.default_backend()
    if device != "cpu":
        return EngineChoice("xla", f"JAX runs on {device}, and the onnxruntime engine runs on CPU only")

    path = calibration_path(backbone_name, weights_sha256)
    record = _read_record(path, "engines")
    if record is not None:
        return EngineChoice(record["engine"], f"{describe(record)}; record {path}", record)
    record = calibrate(backbone_name, weights_name, weights_path)
    if _write_record(path, record):
        return EngineChoice(record["engine"], f"{describe(record)}; record {path}", record)
    return EngineChoice(record["engine"], describe(record), record)


def describe(record: dict) -> str:
    """Format a calibration record's figures: `measured 2026-12-04 22:46:10 +0000: xla 62.3 img/s, onnxruntime 181.3 img/s, max abs difference 8.1e-06`."""
    figures = [f"{engine} {record[f'{engine}_images_per_second']:.1f} img/s" for engine in ENGINES if record.get(f"{engine}_images_per_second")]
    if record.get("max_abs_diff") is not None:
        figures.append(f"max abs difference {record['max_abs_diff']:.1e}")
    if record.get("error"):
        figures.append(record["error"])
    when = f" {record['measured_at']}" if isinstance(record.get("measured_at"), str) else ""
    return f"measured{when}: " + ", ".join(figures)


def calibration_path(backbone_name: str, weights_sha256: str, measure: str = "engines", images: str = "probe") -> Path:
    """Return where the calibration record of this backbone, weights file and machine is kept.

    `measure` is "engines" (the engine choice) or "bfloat16" (the bfloat16 fidelity
    check), and `images` names the images measured: "probe" or a digest of their keys.
    """
    from crackjax.store import digest_of
    from crackjax.versioning import code_digest
    from crackjax.weights.cache import cache_dir

    key = digest_of({
        "backbone": backbone_name,
        "weights_sha256": weights_sha256,
        "machine": _machine(),
        "device": _device(),
        "versions": {name: _version(name) for name in ("jax", "jaxlib", "onnxruntime", "onnx")},
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "ort_threads": os.environ.get("CRACKJAX_ORT_THREADS", ""),
        "code": code_digest("crackjax.onnx_engine", "crackjax.bottleneck", "crackjax.backbones", "crackjax.engines"),
        "probe_batch": PROBE_BATCH,
        "version": CALIBRATION_VERSION,
        "measure": measure,
        "images": images,
    })[:24]
    suffix = "" if measure == "engines" else f"-{measure}"
    return cache_dir() / "engines" / f"{backbone_name}-{key}{suffix}.json"


def probe_images(size: int, count: int = PROBE_BATCH, seed: int = 0) -> np.ndarray:
    """Return `(count, size, size, 3) uint8` images with photo-like statistics: smooth shapes plus grain."""
    rng = np.random.default_rng(seed)
    cells = max(size // 16, 1)
    coarse = rng.uniform(40, 215, (count, cells, cells, 3))
    repeat = -(-size // cells)
    smooth = np.repeat(np.repeat(coarse, repeat, axis=1), repeat, axis=2)[:, :size, :size]
    grain = rng.normal(0.0, 12.0, (count, size, size, 3))
    return np.clip(smooth + grain, 0, 255).astype(np.uint8)


def calibrate(backbone_name: str, weights_name: str, weights_path: str | Path) -> dict:
    """Run both engines on the same probe batch and return the calibration record.

    Each engine runs the batch once to build or compile. Then the engines take turns for
    `TIMED_RUNS` rounds, so a load from other processes slows both alike, and each
    engine's fastest run counts. A failure of the onnxruntime engine is recorded, and XLA
    is chosen.
    """
    from crackjax.bottleneck import feature_fidelity, load_backbone

    started = time.perf_counter()
    xla = load_backbone(backbone_name, weights_name, weights_path, engine="xla")
    images = probe_images(xla.backbone.input_size)
    record = {
        "backbone": backbone_name,
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "probe_batch": len(images),
        "tolerance": PARITY_TOLERANCE,
        "machine": _machine(),
    }
    xla_features = np.asarray(xla.features(images))
    try:
        onnx = load_backbone(backbone_name, weights_name, weights_path, engine="onnxruntime")
        onnx_features = np.asarray(onnx.features(images))
        best = {"xla": float("inf"), "onnxruntime": float("inf")}
        for _ in range(TIMED_RUNS):
            best["xla"] = min(best["xla"], _seconds(xla.features, images))
            best["onnxruntime"] = min(best["onnxruntime"], _seconds(onnx.features, images))
    except Exception as error:  # noqa: BLE001 - any failure of the optional engine means XLA runs
        log.warning("engine: the onnxruntime engine failed on %s (%s: %s); using xla", backbone_name, type(error).__name__, error)
        record.update(engine="xla", error=f"onnxruntime failed: {type(error).__name__}: {error}", max_abs_diff=None)
        record["xla_images_per_second"] = round(len(images) / _seconds(xla.features, images), 2)
        record["seconds"] = round(time.perf_counter() - started, 2)
        return record
    for engine, seconds in best.items():
        record[f"{engine}_images_per_second"] = round(len(images) / seconds, 2)
    fidelity = feature_fidelity(xla_features, onnx_features)
    record["max_abs_diff"] = fidelity["max_abs_diff"]
    record["min_cosine"] = fidelity["min_cosine"]
    if not fidelity["max_abs_diff"] <= PARITY_TOLERANCE:
        log.warning(
            "engine: onnxruntime features of %s differ from xla's by up to %.2e, more than %.0e; using xla",
            backbone_name, fidelity["max_abs_diff"], PARITY_TOLERANCE,
        )
        record["engine"] = "xla"
        record["error"] = f"features differ by more than {PARITY_TOLERANCE:.0e}"
    else:
        faster = record["onnxruntime_images_per_second"] > record["xla_images_per_second"]
        record["engine"] = "onnxruntime" if faster else "xla"
    record["seconds"] = round(time.perf_counter() - started, 2)
    return record


def check_bfloat16(backbone_name: str, weights_name: str, weights_path: str | Path, weights_sha256: str, images: np.ndarray, image_keys: list[str]) -> dict:
    """Check that bfloat16 features of this backbone stay close to float32 ones; return the fidelity record.

    `images` are `(n, size, size, 3) uint8` photos of the dataset and `image_keys` their
    sha256 keys. They run through the XLA engine in float32 and in bfloat16 once per
    machine, backbone, weights file and set of images, and the record is kept beside the
    engine calibrations. Raises CrackjaxError when the min cosine similarity of matching
    feature vectors is below `BFLOAT16_MIN_COSINE`.
    """
    from crackjax.errors import CrackjaxError
    from crackjax.store import digest_of

    path = calibration_path(backbone_name, weights_sha256, "bfloat16", digest_of(sorted(image_keys))[:16])
    record = _read_record(path, "bfloat16")
    if record is None:
        from crackjax.bottleneck import feature_fidelity, load_backbone

        float32 = load_backbone(backbone_name, weights_name, weights_path, engine="xla")
        bfloat16 = load_backbone(backbone_name, weights_name, weights_path, compute_dtype="bfloat16", engine="xla")
        fidelity = feature_fidelity(np.asarray(float32.features(images)), np.asarray(bfloat16.features(images)))
        record = {"backbone": backbone_name, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S %z"), "images": len(images), "machine": _machine(), **fidelity}
        _write_record(path, record)
    where = f" (record {path})" if path.is_file() else ""
    log.info("engine: bfloat16 features of %s have min cosine similarity %.5f to float32 on %d photos%s", backbone_name, record["min_cosine"], record["images"], where)
    # `not >=` also rejects a NaN similarity.
    if not record["min_cosine"] >= BFLOAT16_MIN_COSINE:
        raise CrackjaxError(
            f"bfloat16 features of {backbone_name} reach a min cosine similarity of only {record['min_cosine']:.5f} to float32 "
            f"on {record['images']} photos of this dataset (max abs difference {record['max_abs_diff']:.2g}), below the "
            f"{BFLOAT16_MIN_COSINE} required; train with --compute-dtype float32{where}"
        )
    return record


def _seconds(features, images: np.ndarray) -> float:
    """Return the wall seconds of one forward pass of `images`, results included."""
    started = time.perf_counter()
    np.asarray(features(images))
    return time.perf_counter() - started


def _machine() -> dict:
    """Return the processor model, usable cores and architecture, which decide engine speed."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": model, "cores": cores, "arch": platform.machine()}


def _device() -> str:
    """Return JAX's default platform and device kind, such as `cpu:cpu`."""
    import jax

    return f"{jax.default_backend()}:{jax.devices()[0].device_kind}"


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


# The fields a record must have, by measurement, and the types their values must have.
_NUMBER = (int, float)
_RECORD_FIELDS = {
    "engines": {"backbone": str, "engine": str, "xla_images_per_second": _NUMBER},
    "bfloat16": {"backbone": str, "images": int, "min_cosine": _NUMBER, "max_abs_diff": _NUMBER},
}
_OPTIONAL_NUMBERS = ("onnxruntime_images_per_second", "max_abs_diff")


def _read_record(path: Path, measure: str) -> dict | None:
    """Return the calibration record at `path`, or None when it is absent, unreadable or malformed."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        log.warning("engine: calibration record %s is unreadable (%s); measuring again", path, error)
        return None
    if not _well_formed(record, measure):
        log.warning("engine: calibration record %s is incomplete or has values of the wrong type; measuring again", path)
        return None
    return record


def _well_formed(record, measure: str) -> bool:
    if not isinstance(record, dict):
        return False
    for field, kind in _RECORD_FIELDS[measure].items():
        if not isinstance(record.get(field), kind) or isinstance(record.get(field), bool):
            return False
    if not all(record.get(field) is None or isinstance(record[field], str) for field in ("error", "measured_at")):
        return False
    if measure == "engines":
        if record["engine"] not in ENGINES:
            return False
        return all(record.get(field) is None or isinstance(record[field], _NUMBER) for field in _OPTIONAL_NUMBERS)
    return True


def _write_record(path: Path, record: dict) -> bool:
    """Keep `record` at `path` and return True; on failure, log a warning and return False."""
    from crackjax.atomic import write_json
    from crackjax.errors import DiskFullError

    try:
        write_json(path, record)
    except (OSError, DiskFullError) as error:
        log.warning("engine: cannot write the calibration record %s (%s); the next run measures again", path, error)
        return False
    return True
