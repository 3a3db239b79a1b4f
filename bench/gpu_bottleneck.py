"""Bottleneck throughput on an accelerator, with feature parity against CPU features.

Two modes:
  python bench/gpu_bottleneck.py --write-reference   (on the CPU machine)
      writes bench/gpu_reference.npz: 8 real photos at 224 px and, per backbone, the
      float32 features that crackjax computes for them on CPU with random weights
      (`init` with PRNGKey(0), so any machine rebuilds the same weights).
  python bench/gpu_bottleneck.py --check             (on the GPU machine, via bench/gpu.sh)
      times the jitted forward at each batch size on the default JAX device and
      compares its features for the 8 reference photos with the CPU ones.

The photos travel inside the .npz because the GPU machine has no copy of the dataset.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
REFERENCE = Path(__file__).resolve().parent / "gpu_reference.npz"
BACKBONES = ("efficientnet_lite0", "resnet_v2_50", "resnet_v2_101")
REFERENCE_IMAGES = 8


def _loaded(name: str, compute_dtype: str = "float32"):
    import jax

    from crackjax.backbones import get_backbone
    from crackjax.bottleneck import LoadedBackbone

    backbone = get_backbone(name)
    sample = jax.numpy.zeros((1, backbone.input_size, backbone.input_size, 3), jax.numpy.float32)
    # Weights are initialised on the CPU so every machine gets the same values.
    with jax.default_device(jax.devices("cpu")[0]):
        variables = jax.jit(backbone.build().init)(jax.random.PRNGKey(0), sample)
    variables = jax.device_put(variables, jax.devices()[0])
    return LoadedBackbone(backbone, variables, "random", "", "", compute_dtype)


def write_reference() -> None:
    from bench.bottleneck import real_images
    from crackjax.runtime import configure_jax

    configure_jax()
    images = real_images(REFERENCE_IMAGES)
    arrays = {"images": images}
    for name in BACKBONES:
        arrays[name] = np.asarray(_loaded(name).features(images))
        print(f"{name}: features {arrays[name].shape}", flush=True)
    np.savez_compressed(REFERENCE, **arrays)
    print(f"wrote {REFERENCE} ({REFERENCE.stat().st_size / 1e6:.1f} MB)")


def check(batches: list[int], repeats: int) -> list[dict]:
    import jax

    from crackjax.bottleneck import feature_fidelity

    reference = np.load(REFERENCE)
    images = reference["images"]
    device = jax.devices()[0]
    print(f"device: {device.platform} {device.device_kind}", flush=True)
    results = []
    for name in BACKBONES:
        for compute_dtype in ("float32", "bfloat16"):
            loaded = _loaded(name, compute_dtype)
            parity = feature_fidelity(reference[name], np.asarray(loaded.features(images)))
            for batch in batches:
                tiled = np.resize(images, (batch, *images.shape[1:]))
                on_device = jax.device_put(tiled, device)
                started = time.perf_counter()
                loaded.features(on_device).block_until_ready()
                compile_s = time.perf_counter() - started
                best = float("inf")
                for _ in range(repeats):
                    started = time.perf_counter()
                    loaded.features(on_device).block_until_ready()
                    best = min(best, time.perf_counter() - started)
                result = {
                    "backbone": name, "compute_dtype": compute_dtype, "batch": batch, "device": device.device_kind,
                    "img_per_s": round(batch / best, 1), "compile_s": round(compile_s, 1),
                    "max_abs_diff_vs_cpu": parity["max_abs_diff"], "min_cosine_vs_cpu": parity["min_cosine"],
                }
                results.append(result)
                print(json.dumps(result), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write-reference", action="store_true", help="compute the CPU reference features (run on the CPU machine)")
    mode.add_argument("--check", action="store_true", help="time the accelerator and compare with the reference")
    parser.add_argument("--batches", default="32,128", help="comma-separated batch sizes to time (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed batches per batch size (default %(default)s)")
    parser.add_argument("--json", default=None, help="write the results as a JSON list to this file")
    args = parser.parse_args(argv)

    if args.write_reference:
        write_reference()
        return 0
    results = check([int(value) for value in args.batches.split(",")], args.repeats)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
