#!/usr/bin/env bash
# Bottleneck throughput on a lent GPU, with feature parity against CPU features.
#
# Run from the repository root on the GPU machine:  bash bench/gpu.sh
# Needs bench/gpu_reference.npz, written beforehand on a CPU machine with
#   .venv/bin/python bench/gpu_bottleneck.py --write-reference
# Installs into a fresh venv (/tmp/crackjax-gpu-venv): JAX with CUDA 12 from the
# wheels in $CRACKJAX_GPU_WHEELS (a folder of .whl files) when that is set, else
# from the package index. Prints one JSON line per backbone, dtype and batch size
# and writes them to $OUT/gpu_bottleneck.json (or /tmp when OUT is unset).
# Budget: about 1 to 2 minutes of installing and 2 to 3 minutes of compiling
# and timing; each step has its own timeout so the whole script stays under 5 minutes.
set -euo pipefail

VENV=/tmp/crackjax-gpu-venv
RESULTS="${OUT:-/tmp}/gpu_bottleneck.json"
JAX_VERSION=0.10.2

if [ ! -f bench/gpu_reference.npz ]; then
    echo "bench/gpu_reference.npz is missing; run 'python bench/gpu_bottleneck.py --write-reference' on the CPU machine first" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi not found"

python3 -m venv "$VENV"
PIP=("$VENV/bin/pip" install --quiet --disable-pip-version-check)
if [ -n "${CRACKJAX_GPU_WHEELS:-}" ]; then
    PIP+=(--no-index --find-links "$CRACKJAX_GPU_WHEELS")
fi
# crackjax's own dependencies for the bottleneck only: no Prefect, no torch.
timeout 180 "${PIP[@]}" "jax[cuda12]==$JAX_VERSION" flax==0.12.8 numpy==2.4.6 pillow==13.0.0 pyarrow==26.0.1 h5py==3.16.0 filelock==4.3.2
timeout 60 "${PIP[@]}" --no-deps -e .

"$VENV/bin/python" -c "import jax; print('jax', jax.__version__, jax.devices())"
timeout 240 "$VENV/bin/python" bench/gpu_bottleneck.py --check --batches 32,128 --repeats 5 --json "$RESULTS"
echo "results: $RESULTS"
