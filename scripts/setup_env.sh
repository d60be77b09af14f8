#!/usr/bin/env bash
# Installs what fusedbn needs and builds it when the build is missing or older than its sources.
# Never replaces an installed torch; installs the pinned CPU torch only where none is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[setup] torch not found: installing torch==2.13.0"
  "$PY" -m pip install --quiet torch==2.13.0
fi
echo "[setup] $("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)')"

# Build and test tools; scikit-learn only feeds the training test (bundled digits data set).
missing=$("$PY" - <<'PYEOF'
import importlib.util
need = {"ninja": "ninja", "pybind11": "pybind11", "pytest": "pytest", "sklearn": "scikit-learn",
        "expecttest": "expecttest"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
PYEOF
)
if [ -n "$missing" ]; then
  echo "[setup] installing: $missing"
  # shellcheck disable=SC2086
  "$PY" -m pip install --quiet $missing || echo "[setup] warning: could not install $missing (offline?)"
fi

# Rebuild when fusedbn does not import or a source is newer than the built extensions.
stale=$("$PY" - <<'PYEOF'
import glob, os
try:
    import fusedbn  # noqa: F401
except Exception:
    print("missing"); raise SystemExit
built = glob.glob("fusedbn/_C*.so") + glob.glob("fusedbn/_cpu_*.so")
if not built or not os.path.samefile(os.path.dirname(fusedbn.__file__), "fusedbn"):
    print("missing"); raise SystemExit
sources = glob.glob("csrc/**/*", recursive=True) + ["setup.py"]
newest = max(os.path.getmtime(s) for s in sources if os.path.isfile(s))
print("stale" if newest > min(os.path.getmtime(b) for b in built) else "")
PYEOF
)
if [ -n "$stale" ]; then
  echo "[setup] building fusedbn ($stale build): pip install --no-build-isolation -e ."
  MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip install --no-build-isolation --no-deps -e . 2>&1 \
    | grep -E "^\s*(fusedbn|torch|CPU kernels|CUDA kernels|MAX_JOBS)|Successfully|[Ee]rror" || true
  "$PY" -c "import fusedbn" || { echo "[setup] build failed" >&2; exit 1; }
fi
echo "[setup] $("$PY" -c 'import fusedbn; print("fusedbn", fusedbn.build_info())')"
