"""Child processes for the fault tests: each command does one real piece of work and exits.

Run as `python workers.py COMMAND JSON-ARGUMENTS`. A CrackjaxError is printed as
`error: <type>: <message>` with exit code 3, so a test can tell it from a crash.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
from pathlib import Path


def bottleneck(args: dict) -> None:
    """Compute features for `keys` from the pixel store into the feature store, part by part."""
    from crackjax.backbones import resolve_backbone
    from crackjax.bottleneck import compute_shard, load_backbone
    from crackjax.store import PartStore

    resolved = resolve_backbone("efficientnet_lite0", None, download=False)
    loaded = load_backbone(resolved.backbone.name, resolved.weights.name, resolved.weights_path)
    features = PartStore(args["features"])
    present = features.keys()
    keys = [key for key in args["keys"] if key not in present]
    computed = compute_shard(loaded, PartStore(args["pixels"]), features, keys, batch_size=args["batch_size"], part_size=args["part_size"])
    print(json.dumps({"computed": computed}))


def preprocess(args: dict) -> None:
    """Decode the images of a dataset table into the workspace's pixel store."""
    import pyarrow.parquet as pq

    from crackjax.preprocess import preprocess_images

    table = pq.read_table(args["dataset"])
    result = preprocess_images(args["root"], table, args["workspace"], args["input_size"], shard_size=args["shard_size"])
    print(json.dumps({"computed": result.computed, "cached": result.cached}))


def export_loop(args: dict) -> None:
    """Export the same head again and again under new model ids, until killed."""
    from crackjax.export import export_model, load_head_state

    state = load_head_state(args["source_model"])
    manifest = json.loads((Path(args["source_model"]) / "manifest.json").read_text(encoding="utf-8"))
    manifest = {key: value for key, value in manifest.items() if key in ("labels", "backbone", "head", "preprocessing")}
    for index in range(args["count"]):
        export_model(args["workspace"], model_id=f"loop-{index:04d}", head_state=state, manifest=manifest, metrics={}, history=[], rejected=[])
        print(f"exported loop-{index:04d}", flush=True)


COMMANDS = {"bottleneck": bottleneck, "preprocess": preprocess, "export_loop": export_loop}


def main() -> int:
    from crackjax.errors import CrackjaxError

    command, arguments = sys.argv[1], json.loads(sys.argv[2])
    limit = arguments.get("file_size_limit")
    if limit:
        # With SIGXFSZ ignored, a write past the limit fails with EFBIG, as on a full disk.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        COMMANDS[command](arguments)
    except CrackjaxError as error:
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main())
