"""Measure the peak memory (RSS) of the bottleneck stage on the real images and on a synthesized large set.

Usage: `python bench/bottleneck_rss.py --images 20000 [--backbone efficientnet_lite0] [--timeout 900]`

With `--images 400` the real images are used as they are (symlinks). With more, the
set is synthesized under `--root` (default /tmp/crackjax-bench-rss, never the
repository) from the real images: flips, rotations by 90/180/270 degrees and crops
of 200 to 240 pixels, each saved as a new JPEG under a new name, so every file has
its own sha256. Ingest and preprocess run in this process; the bottleneck stage
(plan, shards, finish) runs in a child process whose peak RSS `os.wait4` reports.
When `--timeout` ends the child early, the report says how many features it wrote.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pipeline import link_assets

REPO = Path(__file__).resolve().parent.parent
# The real images lie beside the repository, as for the tests; CRACKJAX_BENCH_IMAGES overrides.
DATASET = Path(os.environ.get("CRACKJAX_BENCH_IMAGES", Path(__file__).resolve().parents[2] / "shared" / "datasets" / "sdnet2018-decks"))


def synthesize(folder: Path, count: int, seed: int = 0) -> int:
    """Write `count` augmented copies of the real images into `folder/<label>/`; existing files are kept."""
    from PIL import Image, ImageOps

    sources = sorted(DATASET.glob("*/*.jpg"))
    rng = random.Random(seed)
    written = 0
    for index in range(count):
        source = sources[index % len(sources)]
        target = folder / source.parent.name / f"synthetic-{index:06d}.jpg"
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(source) as image:
            image = image.convert("RGB")
            if rng.random() < 0.5:
                image = ImageOps.mirror(image)
            image = image.rotate(rng.choice((0, 90, 180, 270)))
            side = rng.randint(200, min(240, *image.size))
            left, top = rng.randint(0, image.width - side), rng.randint(0, image.height - side)
            image.crop((left, top, left + side, top + side)).save(target, quality=rng.randint(85, 95))
        written += 1
    return written


def bottleneck_child(state_path: str) -> int:
    """Run the bottleneck stages as the flow does, in this (child) process."""
    from crackjax import stages

    state = json.loads(Path(state_path).read_text())
    started = time.perf_counter()
    plan = stages.bottleneck_plan_stage(state["preprocessed"], state["backbone"], state["workspace"])
    computed = [
        stages.bottleneck_shard_stage(plan, index, state["preprocessed"], state["backbone"], state["workspace"])
        for index in range(plan["shards"])
    ]
    stages.bottleneck_finish_stage(plan, computed, time.perf_counter() - started, state["preprocessed"], state["backbone"], state["workspace"])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=400, help="400 for the real set, more to synthesize (default %(default)s)")
    parser.add_argument("--backbone", default="efficientnet_lite0", help="backbone name (default %(default)s)")
    parser.add_argument("--engine", choices=("xla", "onnxruntime"), default="xla", help="bottleneck runtime (default %(default)s)")
    parser.add_argument("--root", default="/tmp/crackjax-bench-rss", help="scratch folder for images and workspace (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds the bottleneck child may run (default %(default)s)")
    parser.add_argument("--json", default=None, help="append the result as a JSON line to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        return bottleneck_child(args.child)

    root = Path(args.root) / str(args.images)
    if root.resolve().is_relative_to(REPO):
        raise SystemExit(f"--root {args.root} is inside the repository; choose a folder under /tmp")
    assets, workspace = root / "assets", root / "workspace"
    started = time.perf_counter()
    if args.images <= 400:
        count = link_assets(assets)
    else:
        synthesize(assets, args.images)
        count = args.images
    synthesize_s = time.perf_counter() - started

    from crackjax import stages
    from crackjax.store import PartStore

    started = time.perf_counter()
    ingested = stages.ingest_stage(assets, workspace)
    backbone = stages.resolve_backbone_stage(args.backbone, None, engine=args.engine)
    preprocessed = stages.preprocess_stage(ingested, workspace, backbone["input_size"])
    prepare_s = time.perf_counter() - started

    # A fresh feature store each time, so the child computes every image.
    plan = stages.bottleneck_plan_stage(preprocessed, backbone, workspace)
    shutil.rmtree(plan["features"], ignore_errors=True)
    state_path = root / "state.json"
    state_path.write_text(json.dumps({"preprocessed": preprocessed, "backbone": backbone, "workspace": str(workspace)}))

    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, __file__, "--child", str(state_path)], cwd=REPO)
    deadline = started + args.timeout
    timed_out = False
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            process.kill()
            timed_out = True
            pid, status, usage = os.wait4(process.pid, 0)
            break
        time.sleep(0.2)
    seconds = time.perf_counter() - started
    computed = len(PartStore(plan["features"]).keys()) if Path(plan["features"]).exists() else 0

    result = {
        "images": count,
        "backbone": args.backbone,
        "synthesize_s": round(synthesize_s, 1),
        "ingest_and_preprocess_s": round(prepare_s, 1),
        "bottleneck_s": round(seconds, 1),
        "features_written": computed,
        "timed_out": timed_out,
        "exit_code": os.waitstatus_to_exitcode(status),
        "bottleneck_peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "img_per_s": round(computed / seconds, 1) if seconds else None,
    }
    print(json.dumps(result))
    if args.json:
        with open(args.json, "a") as handle:
            handle.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
