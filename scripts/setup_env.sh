#!/usr/bin/env bash
# Installs what fusedbn needs and builds it when the build is missing or older than its sources.
# Never replaces an installed torch; installs the pinned CPU torch only where none is installed.
# The build shows its progress: every compiled unit as ninja finishes it ([k/n], which extension,
# which source), prefixed with the seconds since the build started; the full log is
# build/setup-build.log.
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

# What the build and the main job (scripts/run.sh) use besides: wheel (pyproject.toml's build
# requirement, absent from a fresh venv's setuptools < 70.1, which pip's --no-build-isolation
# then needs installed), numpy (without it torch warns "Failed to initialize NumPy" at every
# import) and matplotlib (the benchmark's plot).
missing_main=$("$PY" - <<'PYEOF'
import importlib.util
main_job = {"wheel": "wheel", "numpy": "numpy", "matplotlib": "matplotlib"}
print(" ".join(pkg for mod, pkg in main_job.items() if importlib.util.find_spec(mod) is None))
PYEOF
)
if [ -n "$missing_main" ]; then
  echo "[setup] installing: $missing_main"
  # shellcheck disable=SC2086
  "$PY" -m pip install --quiet $missing_main \
    || echo "[setup] warning: could not install $missing_main (offline?): the plot is skipped"
fi

# Shortens pip -v's build output to the progress lines: the build configuration, each extension,
# ninja's [k/n] line per finished unit (as "[k/n] extension: source"), errors and the result;
# each prefixed with the seconds since the build started.
build_progress() {
  local start line unit ext
  start=$(date +%s)
  while IFS= read -r line; do
    case "$line" in
      *"["[0-9]*/[0-9]*"] "*" -c "*)
        unit=${line##* -c }; unit=${unit%% *}; unit=${unit#"$PWD"/}
        ext=${line##* -o }; ext=${ext%% *}; ext=${ext%/csrc/*}; ext=${ext##*/}
        ext=${ext/fusedbn__/fusedbn._}
        line="${line%%] *}] $ext: $unit" ;;
      *"["[0-9]*/[0-9]*"] "*) line="${line%% /*}" ;;  # a link or other step: its [k/n] only
      *"build configuration:"*|*" torch "*"(CUDA "*|*" CPU kernels: "*|*" CUDA kernels: "*) ;;
      *" MAX_JOBS="*) ;;
      *"building '"*"' extension"*) line="building ${line#*building }" ;;
      *"error:"*|*"Error"*|*FAILED*|*"Successfully"*) ;;
      *) continue ;;
    esac
    printf '[setup %4ds] %s\n' "$(( $(date +%s) - start ))" "$line"
  done
}

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
  mkdir -p build
  log=build/setup-build.log
  echo "[setup] building fusedbn ($stale build): pip install -v --no-build-isolation -e ." \
       "(MAX_JOBS=${MAX_JOBS:-2}; full log: $log)"
  t0=$(date +%s)
  set +e
  PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-2} \
    "$PY" -m pip install -v --no-build-isolation --no-deps -e . 2>&1 | tee "$log" | build_progress
  status=${PIPESTATUS[0]}
  set -e
  if [ "$status" -ne 0 ] || ! "$PY" -c "import fusedbn" 2>/dev/null; then
    echo "[setup] build failed (pip exit status $status); the end of $log:" >&2
    tail -n 40 "$log" >&2
    exit 1
  fi
  echo "[setup] built in $(( $(date +%s) - t0 )) s"
fi
echo "[setup] $("$PY" -c 'import fusedbn; print("fusedbn", fusedbn.build_info())')"
