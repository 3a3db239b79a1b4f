"""Time the bottleneck forward pass of crackjax and its peers on the same architecture, batch and input.

Usage: `python bench/bottleneck.py --backbone resnet_v2_50 --batch 32`

Each engine runs in its own process, one after the other, so thread pools and XLA
flags do not mix. Every engine gets the same batch of real SDNET2018 photos resized to
the backbone's input size and random weights (each framework's own initialisation),
runs one warm-up batch (compilation) and then `--repeats` timed batches; the best
batch counts. Output: one table row per engine with img/s and the ratio to the
fastest float32 peer, and a JSON file with the raw figures.

Engines:
  crackjax          `LoadedBackbone.forward` (uint8 in, features out) as the bottleneck stage runs it
  crackjax-noxnn    the same with CRACKJAX_XNN_FUSION=0 (XLA's default CPU code generation)
  crackjax-bf16     the same with compute dtype bfloat16
  crackjax-ort      crackjax's onnxruntime engine: an ONNX graph built from the same Flax variables
                    (`crackjax.onnx_engine`), uint8 in, features out
  tensorflow        Keras Applications ResNetV2 on the TensorFlow backend (no TF model for Lite0)
  torch             PyTorch float32, channels-last
  torch-bf16        PyTorch with bfloat16 autocast, channels-last
  onnxruntime       the PyTorch model exported to ONNX, run by ONNX Runtime
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
# The real images lie beside the repository, as for the tests; CRACKJAX_BENCH_IMAGES overrides.
DATASET = Path(os.environ.get("CRACKJAX_BENCH_IMAGES", Path(__file__).resolve().parents[2] / "shared" / "datasets" / "sdnet2018-decks"))
ENGINES = ("crackjax", "crackjax-noxnn", "crackjax-bf16", "crackjax-ort", "tensorflow", "onnxruntime", "torch", "torch-bf16")
FLOAT32_PEERS = ("tensorflow", "onnxruntime", "torch")
KERAS_MODELS = {"resnet_v2_50": "ResNet50V2", "resnet_v2_101": "ResNet101V2", "resnet_v2_152": "ResNet152V2"}
INPUT_SIZE = 224


def real_images(count: int, size: int = INPUT_SIZE) -> np.ndarray:
    """Return `(count, size, size, 3) uint8` photos from DATASET (cycled when there are fewer), resized with Pillow."""
    from PIL import Image

    files = sorted(DATASET.glob("*/*.jpg"))
    if not files:
        raise SystemExit(f"no JPEG images under {DATASET}/*/; set CRACKJAX_BENCH_IMAGES to a folder with one sub-folder per label")
    images = np.zeros((count, size, size, 3), np.uint8)
    for index in range(count):
        with Image.open(files[index % len(files)]) as image:
            images[index] = np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR))
    return images


def _time_batches(run, repeats: int) -> tuple[float, list[float]]:
    """Call `run()` once (warm-up, compilation) and `repeats` more times; return the warm-up and timed seconds."""
    started = time.perf_counter()
    run()
    warmup = time.perf_counter() - started
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - started)
    return warmup, seconds


def _run_crackjax(backbone_name: str, images: np.ndarray, repeats: int, compute_dtype: str, engine: str = "xla"):
    from crackjax.runtime import configure_jax

    configure_jax()
    import jax

    from crackjax.backbones import get_backbone
    from crackjax.bottleneck import LoadedBackbone
    from crackjax.onnx_engine import OnnxBackbone

    backbone = get_backbone(backbone_name)
    sample = jax.numpy.zeros((1, backbone.input_size, backbone.input_size, 3), jax.numpy.float32)
    variables = jax.jit(backbone.build().init)(jax.random.PRNGKey(0), sample)
    if engine == "onnxruntime":
        loaded = OnnxBackbone(backbone, jax.tree_util.tree_map(np.asarray, variables), "random", "", "")
    else:
        loaded = LoadedBackbone(backbone, variables, "random", "", "", compute_dtype)
    outputs = []

    def run():
        outputs.append(np.asarray(loaded.features(images)))

    warmup, seconds = _time_batches(run, repeats)
    return warmup, seconds, outputs[-1]


def _run_tensorflow(backbone_name: str, images: np.ndarray, repeats: int):
    os.environ["KERAS_BACKEND"] = "tensorflow"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    if backbone_name not in KERAS_MODELS:
        raise NotImplementedError(f"Keras Applications has no {backbone_name}")
    model = getattr(keras.applications, KERAS_MODELS[backbone_name])(weights=None, include_top=False, pooling="avg", input_shape=(INPUT_SIZE, INPUT_SIZE, 3))
    forward = tf.function(lambda x: model(x, training=False))
    x = tf.constant(images.astype(np.float32) / 127.5 - 1.0)
    outputs = []

    def run():
        outputs.append(forward(x).numpy())

    warmup, seconds = _time_batches(run, repeats)
    return warmup, seconds, outputs[-1]


def _torch_input(images: np.ndarray):
    import torch

    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)
    return x.contiguous(memory_format=torch.channels_last)


def _run_torch(backbone_name: str, images: np.ndarray, repeats: int, bfloat16: bool):
    import torch

    from bench.torch_models import build

    torch.manual_seed(0)
    model = build(backbone_name).to(memory_format=torch.channels_last)
    x = _torch_input(images)
    outputs = []

    def run():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
            outputs.append(model(x).float().numpy())

    warmup, seconds = _time_batches(run, repeats)
    return warmup, seconds, outputs[-1]


def _run_onnxruntime(backbone_name: str, images: np.ndarray, repeats: int):
    import onnxruntime
    import torch

    from bench.torch_models import build

    torch.manual_seed(0)
    model = build(backbone_name)
    x = _torch_input(images).contiguous()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{backbone_name}.onnx"
        torch.onnx.export(model, (x[:1],), str(path), input_names=["images"], output_names=["features"], dynamic_axes={"images": {0: "batch"}}, dynamo=False)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = os.cpu_count() or 1
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"images": x.numpy()}
    outputs = []

    def run():
        outputs.append(session.run(None, feed)[0])

    warmup, seconds = _time_batches(run, repeats)
    return warmup, seconds, outputs[-1]


def run_worker(engine: str, backbone: str, batch: int, repeats: int, features_path: str | None) -> dict:
    """Time one engine in this process and return its figures."""
    images = real_images(batch)
    if engine == "crackjax":
        warmup, seconds, features = _run_crackjax(backbone, images, repeats, "float32")
    elif engine == "crackjax-noxnn":
        os.environ["CRACKJAX_XNN_FUSION"] = "0"
        warmup, seconds, features = _run_crackjax(backbone, images, repeats, "float32")
    elif engine == "crackjax-bf16":
        warmup, seconds, features = _run_crackjax(backbone, images, repeats, "bfloat16")
    elif engine == "crackjax-ort":
        warmup, seconds, features = _run_crackjax(backbone, images, repeats, "float32", engine="onnxruntime")
    elif engine == "tensorflow":
        warmup, seconds, features = _run_tensorflow(backbone, images, repeats)
    elif engine == "torch":
        warmup, seconds, features = _run_torch(backbone, images, repeats, bfloat16=False)
    elif engine == "torch-bf16":
        warmup, seconds, features = _run_torch(backbone, images, repeats, bfloat16=True)
    elif engine == "onnxruntime":
        warmup, seconds, features = _run_onnxruntime(backbone, images, repeats)
    else:
        raise SystemExit(f"unknown engine {engine!r}; expected one of {', '.join(ENGINES)}")

    if features_path:
        np.save(features_path, features)
    best = min(seconds)
    return {
        "engine": engine,
        "backbone": backbone,
        "batch": batch,
        "warmup_s": round(warmup, 3),
        "batch_s": [round(value, 4) for value in seconds],
        "img_per_s": round(batch / best, 2),
        "feature_shape": list(features.shape),
    }


def _compare(reference: np.ndarray, candidate: np.ndarray) -> dict:
    from crackjax.bottleneck import feature_fidelity

    return feature_fidelity(reference, candidate)


def run_all(backbone: str, batch: int, repeats: int, engines: list[str], timeout: float) -> list[dict]:
    """Run each engine in a child process and return their figures, with ratios and crackjax feature parity."""
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for engine in engines:
            features_path = str(Path(folder) / f"{engine}.npy")
            command = [sys.executable, __file__, "--worker", engine, "--backbone", backbone, "--batch", str(batch), "--repeats", str(repeats), "--features", features_path]
            try:
                finished = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)
            except subprocess.TimeoutExpired:
                results.append({"engine": engine, "backbone": backbone, "batch": batch, "error": f"timed out after {timeout:.0f} s"})
                continue
            lines = [line for line in finished.stdout.splitlines() if line.startswith("{")]
            if finished.returncode != 0 or not lines:
                last = (finished.stderr.strip().splitlines() or ["no output"])[-1]
                results.append({"engine": engine, "backbone": backbone, "batch": batch, "error": last[:200]})
                continue
            result = json.loads(lines[-1])
            result["features_path"] = features_path
            results.append(result)

        # Engines that share crackjax's random weights are compared feature by feature.
        reference = next((r for r in results if r["engine"] == "crackjax-noxnn" and "error" not in r), None)
        for result in results:
            if reference is not None and result["engine"].startswith("crackjax") and "error" not in result:
                result["parity_vs_noxnn"] = _compare(np.load(reference["features_path"]), np.load(result["features_path"]))
        for result in results:
            result.pop("features_path", None)

    peers = [r["img_per_s"] for r in results if r["engine"] in FLOAT32_PEERS and "error" not in r]
    fastest_peer = max(peers) if peers else None
    for result in results:
        if fastest_peer and "img_per_s" in result:
            result["ratio_to_fastest_float32_peer"] = round(result["img_per_s"] / fastest_peer, 2)
    return results


def print_table(results: list[dict]) -> None:
    print(f"{'backbone':<20} {'engine':<16} {'batch':>5} {'img/s':>8} {'ratio':>6} {'warm-up s':>9}  parity vs crackjax-noxnn")
    for r in results:
        if "error" in r:
            print(f"{r['backbone']:<20} {r['engine']:<16} {r['batch']:>5} {'-':>8} {'-':>6} {'-':>9}  error: {r['error']}")
            continue
        parity = r.get("parity_vs_noxnn")
        parity_text = f"max abs diff {parity['max_abs_diff']:.2e}, min cosine {parity['min_cosine']:.6f}" if parity else ""
        ratio = r.get("ratio_to_fastest_float32_peer")
        print(f"{r['backbone']:<20} {r['engine']:<16} {r['batch']:>5} {r['img_per_s']:>8.1f} {ratio if ratio is not None else '-':>6} {r['warmup_s']:>9.1f}  {parity_text}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet_v2_50", help="crackjax backbone name (default %(default)s)")
    parser.add_argument("--batch", type=int, default=32, help="images per forward pass (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed batches after the warm-up batch (default %(default)s)")
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated engines (default: all)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds each engine may take (default %(default)s)")
    parser.add_argument("--json", default=None, help="append the results as JSON lines to this file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--features", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(run_worker(args.worker, args.backbone, args.batch, args.repeats, args.features)))
        return 0

    results = run_all(args.backbone, args.batch, args.repeats, [e.strip() for e in args.engines.split(",") if e.strip()], args.timeout)
    print_table(results)
    if args.json:
        with open(args.json, "a") as handle:
            for result in results:
                handle.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
