#!/usr/bin/env bash
# The main job: set up and build if needed (scripts/setup_env.sh), check fusedbn against torch.nn
# on every device here (python -m fusedbn.check), then a short benchmark -- 30 cases, about 2
# minutes on 2 CPU cores -- that prints its table and writes its JSON and PNG to benchmarks/out/
# (git-ignored; the paths are printed at the end). Options:
#   --full            the full sweep instead (64 cases on the CPU), also into benchmarks/out/
#   --commit-results  the full sweep into benchmarks/results/<device>.json and .png: the
#                     committed files the README's performance section is generated from
#                     (python -m benchmarks --report)
# Any other argument goes to the benchmark (python -m benchmarks --help), e.g. --threads 4.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bench=(--preset main --check)
rest=()
for arg in "$@"; do
  case "$arg" in
    --full) bench=(--check) ;;
    --commit-results) bench=(--check --commit-results) ;;
    *) rest+=("$arg") ;;
  esac
done
bash scripts/setup_env.sh
"$PY" -m fusedbn.check
exec "$PY" -m benchmarks "${bench[@]}" ${rest[@]+"${rest[@]}"}
