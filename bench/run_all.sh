#!/usr/bin/env bash
# Run every crackjax benchmark in turn. Results go to $RESULTS_DIR (default
# /tmp/crackjax-bench-results), never into the repository.
#
#   bash bench/run_all.sh            # all benchmarks, about 40 minutes on 2 cores
#   LARGE_IMAGES=0 bash bench/run_all.sh   # skip the synthesized large set
#
# The peers need the bench extra: tensorflow-cpu, onnxruntime and onnx (docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-.venv/bin/python}"
RESULTS_DIR="${RESULTS_DIR:-/tmp/crackjax-bench-results}"
LARGE_IMAGES="${LARGE_IMAGES:-20000}"
LARGE_TIMEOUT="${LARGE_TIMEOUT:-600}"
mkdir -p "$RESULTS_DIR"

lscpu | grep -E "Model name|^CPU\(s\)" | tee "$RESULTS_DIR/machine.txt"

for backbone in resnet_v2_50 resnet_v2_101 efficientnet_lite0; do
    "$PYTHON" bench/bottleneck.py --backbone "$backbone" --batch 32 --repeats 5 --json "$RESULTS_DIR/bottleneck.jsonl"
done

"$PYTHON" bench/pipeline.py --json "$RESULTS_DIR/pipeline.jsonl"

"$PYTHON" bench/bottleneck_rss.py --images 400 --json "$RESULTS_DIR/rss.jsonl"
if [ "$LARGE_IMAGES" != 0 ]; then
    "$PYTHON" bench/bottleneck_rss.py --images "$LARGE_IMAGES" --timeout "$LARGE_TIMEOUT" --json "$RESULTS_DIR/rss.jsonl"
fi
echo "results in $RESULTS_DIR"
