#!/usr/bin/env bash
# The main job: set up and build if needed, check fusedbn against torch.nn on every device here,
# then run the kernel benchmark and print its table (extra arguments go to the benchmark).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup_env.sh
"$PY" -m fusedbn.check
exec "$PY" -m benchmarks "$@"
