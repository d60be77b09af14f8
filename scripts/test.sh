#!/usr/bin/env bash
# Sets up (installing and building only what is missing) and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup_env.sh
exec "$PY" -m pytest tests -q "$@"
