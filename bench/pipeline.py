"""Time the crack-train flow, predict and head training as a user runs them.

Usage: `python bench/pipeline.py [--root /tmp/crackjax-bench] [--backbone efficientnet_lite0]`

Everything is written under `--root` (default /tmp/crackjax-bench), never into the
repository: a folder of symlinks to the real images, the workspace, the crackjax
cache (weights symlinks and JAX compilation cache) and the Prefect home. Steps:

1. `crackjax train` cold: empty workspace, empty compilation cache, new Prefect home.
2. `crackjax train` warm: the same data again, so every stage is a cache hit.
3. `crackjax train` incremental: 10 images added (flipped copies under new names).
4. `crackjax predict IMAGE` in a new process: first with an empty compilation cache,
   then `--predict-runs` times with the cache the first run filled.
5. Predict in one process: median milliseconds per image over 20 calls after a warm-up.
6. The train stage with 100 epochs and early stopping off.

Whole-process figures (wall seconds, peak RSS of the process) come from `os.wait4`.
Results print as a table and are appended as JSON lines to `--json`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The real images lie beside the repository, as for the tests; CRACKJAX_BENCH_IMAGES overrides.
DATASET = Path(os.environ.get("CRACKJAX_BENCH_IMAGES", Path(__file__).resolve().parents[2] / "shared" / "datasets" / "sdnet2018-decks"))
CRACKJAX = str(Path(sys.executable).parent / "crackjax")


def run_measured(command: list[str], env: dict[str, str], timeout: float) -> dict:
    """Run `command` and return exit code, wall seconds, peak RSS (MiB, from `os.wait4`) and the last output lines."""
    started = time.perf_counter()
    log_path = Path(env["CRACKJAX_BENCH_ROOT"]) / "last-command.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = started + timeout
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                process.kill()
                pid, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(0.05)
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
    return {"returncode": process.returncode, "wall_s": round(seconds, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "output_tail": tail}


def link_assets(folder: Path) -> int:
    """Fill `folder/<label>/` with symlinks to the real images; return how many."""
    count = 0
    for source in sorted(DATASET.glob("*/*.jpg")):
        target = folder / source.parent.name / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to(source)
        count += 1
    return count


def add_flipped_images(folder: Path, count: int) -> None:
    """Write `count` left-right flipped copies of real images under new names into `folder/<label>/`."""
    from PIL import Image, ImageOps

    sources = sorted(DATASET.glob("*/*.jpg"))[:count]
    for index, source in enumerate(sources):
        with Image.open(source) as image:
            ImageOps.mirror(image.convert("RGB")).save(folder / source.parent.name / f"added-{index:03d}.jpg", quality=90)


def environment(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["CRACKJAX_CACHE"] = str(root / "cache")
    env["PREFECT_HOME"] = str(root / "prefect")
    env["CRACKJAX_BENCH_ROOT"] = str(root)
    env.pop("PREFECT_API_URL", None)
    return env


def link_weights(root: Path) -> None:
    """Make the weights already in the user's crackjax cache visible in the benchmark's cache, without copying."""
    from crackjax.weights.cache import cache_dir

    source = cache_dir() / "weights"
    target = root / "cache" / "weights"
    target.mkdir(parents=True, exist_ok=True)
    for path in source.glob("*"):
        if path.is_file() and not path.name.endswith(".lock") and not (target / path.name).exists():
            (target / path.name).symlink_to(path)


def predict_in_process(workspace: Path, image: Path, calls: int = 20) -> dict:
    """Load the newest model once and time `calls` single-image predictions after one warm-up call."""
    from crackjax.export import newest_model
    from crackjax.predict import Predictor, predict_path

    started = time.perf_counter()
    predictor = Predictor(newest_model(workspace))
    predict_path(predictor, image)
    first = time.perf_counter() - started
    milliseconds = []
    for _ in range(calls):
        started = time.perf_counter()
        predict_path(predictor, image)
        milliseconds.append((time.perf_counter() - started) * 1000)
    return {"load_and_first_s": round(first, 2), "median_ms_per_image": round(statistics.median(milliseconds), 1), "min_ms": round(min(milliseconds), 1)}


def head_training(assets: Path, workspace: Path, backbone: str, epochs: int = 100) -> dict:
    """Run the train stage for `epochs` epochs with early stopping off, on the cached features."""
    from crackjax import stages

    ingested = stages.ingest_stage(assets, workspace)
    resolved = stages.resolve_backbone_stage(backbone, None)
    preprocessed = stages.preprocess_stage(ingested, workspace, resolved["input_size"])
    plan = stages.bottleneck_plan_stage(preprocessed, resolved, workspace)
    if plan["missing"]:
        raise SystemExit(f"{plan['missing']} images have no features; run the train steps first")
    features = {"features": plan["features"], "feature_size": resolved["feature_size"]}
    trained = stages.train_stage(preprocessed, features, {"epochs": epochs, "patience": 0}, workspace)
    return {"epochs": trained["epochs_run"], "seconds": round(trained["seconds"], 2), "validation_accuracy": trained["validation_accuracy"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="/tmp/crackjax-bench", help="scratch folder, emptied first (default %(default)s)")
    parser.add_argument("--backbone", default="efficientnet_lite0", help="backbone for crackjax train (default %(default)s)")
    parser.add_argument("--predict-runs", type=int, default=3, help="new predict processes with a filled compilation cache (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one command may take (default %(default)s)")
    parser.add_argument("--json", default=None, help="append the results as JSON lines to this file")
    args = parser.parse_args(argv)

    root = Path(args.root)
    if root.resolve().is_relative_to(REPO):
        raise SystemExit(f"--root {root} is inside the repository; choose a folder under /tmp")
    shutil.rmtree(root, ignore_errors=True)
    assets, workspace = root / "assets", root / "workspace"
    root.mkdir(parents=True)
    images = link_assets(assets)
    link_weights(root)
    env = environment(root)
    os.environ.update({key: env[key] for key in ("CRACKJAX_CACHE", "PREFECT_HOME")})

    train = [CRACKJAX, "train", str(assets), "--workspace", str(workspace), "--backbone", args.backbone]
    results: dict[str, dict] = {"machine": {"cpus": os.cpu_count(), "images": images, "backbone": args.backbone}}
    results["train_cold"] = run_measured(train, env, args.timeout)
    results["train_warm"] = run_measured(train, env, args.timeout)
    add_flipped_images(assets, 10)
    results["train_incremental_10"] = run_measured(train, env, args.timeout)

    image = next(assets.glob("CD/*.jpg"))
    predict = [CRACKJAX, "predict", str(image), "--workspace", str(workspace)]
    shutil.rmtree(root / "cache" / "jax", ignore_errors=True)
    results["predict_new_process_empty_cache"] = run_measured(predict, env, args.timeout)
    runs = [run_measured(predict, env, args.timeout) for _ in range(args.predict_runs)]
    results["predict_new_process_cached"] = {
        "median_wall_s": statistics.median(run["wall_s"] for run in runs),
        "wall_s": [run["wall_s"] for run in runs],
        "peak_rss_mib": max(run["peak_rss_mib"] for run in runs),
        "returncodes": [run["returncode"] for run in runs],
    }

    from crackjax.runtime import configure_jax

    configure_jax()
    results["predict_in_process"] = predict_in_process(workspace, image)
    results["head_training_100_epochs"] = head_training(assets, workspace, args.backbone)

    for name, value in results.items():
        print(f"{name:<34} {json.dumps(value)}")
    if args.json:
        with open(args.json, "a") as handle:
            handle.write(json.dumps(results) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
