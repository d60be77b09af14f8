#!/usr/bin/env bash
# Verifies and measures fusedbn on a GPU in one command, within a time budget (default 510 s):
# build for the GPU that is there, tests/gpu, the full suite on CPU and CUDA, compute-sanitizer,
# the benchmark sweep. Results go to $OUT (or --out DIR); `python -m benchmarks.ingest DIR`
# commits them. `--dry-run --out DIR` rehearses the same stages on the CPU (CI does).
# Options: bash scripts/gpu_check.sh --help (the driver is benchmarks/gpu_check.py).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec "${PYTHON:-python3}" -m benchmarks.gpu_check "$@"
