#!/usr/bin/env bash
# Compile-checks every CUDA source of fusedbn (csrc/**/*.cu) for sm_90 without building the
# extension and without a GPU: each file is compiled with `nvcc -c` to a temporary object, with the
# flags torch.utils.cpp_extension would pass (C++20, the __CUDA_NO_HALF* defines, the torch and
# python include paths, the CXX11 ABI of the installed torch), plus -Wall -Wextra for the host
# side of our own code. A file whose output reports a warning is printed with that output.
#
# Register pressure: ptxas reports (-Xptxas -v) every kernel's registers, stack frame and spill
# stores/loads; the script prints them as one table (kernels sorted by registers, demangled and
# shortened) and fails when a kernel spills (spill stores or loads above 0 bytes), whatever the
# other options. A stack frame without spills (a per-thread array ptxas keeps in local memory) is
# listed apart, not failed.
#
# A CPU-only torch wheel lacks one generated header, c10/cuda/impl/cuda_cmake_macros.h; a stub of
# it is written to a temporary include directory searched after torch's own (so a CUDA build of
# torch uses its real one).
#
# Environment:
#   CUDA_HOME             toolkit root (default: /usr/local/cuda, else nvcc on PATH)
#   PYTHON                python with torch installed (default: python3)
#   MAX_JOBS              parallel nvcc processes (default: 2)
#   NVCC_CHECK_ARCH       compute capability digits (default: 90)
#   NVCC_CHECK_VERBOSE=1  also print each file's raw ptxas register/spill lines
#   NVCC_CHECK_TABLE=FILE also write the register table (tab-separated) to FILE
#   NVCC_CHECK_SPILLS     fail (default): a spilling kernel fails the check; warn: listed only;
#                         a number N: fails when more than N kernels spill (a ratchet for
#                         known spills, .ci/run)
#   NVCC_CHECK_WERROR=1   count a file with warnings as failed
#   NVCC_CHECK_EXTRA_FLAGS  more nvcc flags, split on spaces
#
# Arguments: .cu files to check (default: every csrc/**/*.cu).
#
# Exit status: 0 when every file compiled and the spills are within NVCC_CHECK_SPILLS (or when
# there is no .cu file at all), 1 otherwise.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
JOBS="${MAX_JOBS:-2}"
ARCH="${NVCC_CHECK_ARCH:-90}"

if [ "$#" -gt 0 ]; then
  FILES=("$@")
else
  mapfile -t FILES < <(find csrc -name '*.cu' -type f 2>/dev/null | LC_ALL=C sort)
fi
if [ "${#FILES[@]}" -eq 0 ]; then
  echo "nvcc_check: no .cu files under csrc/; nothing compiled"
  exit 0
fi

if [ -n "${CUDA_HOME:-}" ]; then
  NVCC="$CUDA_HOME/bin/nvcc"
elif [ -x /usr/local/cuda/bin/nvcc ]; then
  NVCC=/usr/local/cuda/bin/nvcc
else
  NVCC="$(command -v nvcc || true)"
fi
if [ -z "$NVCC" ] || [ ! -x "$NVCC" ]; then
  echo "nvcc_check: nvcc not found (set CUDA_HOME, e.g. CUDA_HOME=/usr/local/cuda)" >&2
  exit 1
fi
CUDA_ROOT="$(cd "$(dirname "$NVCC")/.." && pwd)"

# Include paths and ABI of the installed torch, one item per line.
if ! TORCH_INFO="$("$PYTHON" - <<'PY'
import sysconfig
import torch
from torch.utils.cpp_extension import include_paths
print(int(torch._C._GLIBCXX_USE_CXX11_ABI))
print(torch.__version__)
for p in include_paths():
    print(p)
print(sysconfig.get_paths()["include"])
PY
)"; then
  echo "nvcc_check: could not import torch with $PYTHON (set PYTHON)" >&2
  exit 1
fi
mapfile -t INFO <<<"$TORCH_INFO"
ABI="${INFO[0]}"
TORCH_VERSION="${INFO[1]}"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/nvcc_check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/stub/c10/cuda/impl" "$WORK/obj" "$WORK/log"
echo '#define C10_CUDA_BUILD_SHARED_LIBS' >"$WORK/stub/c10/cuda/impl/cuda_cmake_macros.h"

FLAGS=(
  -c -std=c++20 -O3 -lineinfo --expt-relaxed-constexpr
  -gencode "arch=compute_${ARCH},code=sm_${ARCH}"
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
  -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C
  "-D_GLIBCXX_USE_CXX11_ABI=${ABI}"
  -DFUSEDBN_WITH_CUDA "-DFUSEDBN_CUDA_ARCH_LIST=\"sm_${ARCH}\""
  --compiler-options -fPIC
  # Host-compiler warnings for our own code (torch and CUDA headers come in through -isystem).
  -Xcompiler -Wall,-Wextra
  -I "$ROOT/csrc"
)
for inc in "${INFO[@]:2}"; do FLAGS+=(-isystem "$inc"); done
FLAGS+=(-isystem "$WORK/stub" -isystem "$CUDA_ROOT/include")
FLAGS+=(-Xptxas -v)
# shellcheck disable=SC2206  # word splitting of the extra flags is intended
if [ -n "${NVCC_CHECK_EXTRA_FLAGS:-}" ]; then FLAGS+=(${NVCC_CHECK_EXTRA_FLAGS}); fi

echo "nvcc_check: $("$NVCC" --version | tail -n 1)"
echo "nvcc_check: torch $TORCH_VERSION, sm_${ARCH}, C++20, CXX11_ABI=$ABI," \
  "${#FILES[@]} file(s), $JOBS job(s)"

compile_one() {
  local src="$1" tag log start rc
  tag="$(echo "$src" | tr '/.' '__')"
  log="$WORK/log/$tag.log"
  start=$SECONDS
  set +e
  "$NVCC" "${FLAGS[@]}" -o "$WORK/obj/$tag.o" "$src" >"$log" 2>&1
  rc=$?
  set -e
  echo "$rc $((SECONDS - start))" >"$WORK/log/$tag.rc"
}

running=0
for src in "${FILES[@]}"; do
  compile_one "$src" &
  running=$((running + 1))
  if [ "$running" -ge "$JOBS" ]; then
    wait -n || true
    running=$((running - 1))
  fi
done
wait || true

DEMANGLE=cat
if command -v c++filt >/dev/null 2>&1; then DEMANGLE=c++filt; fi
failed=0
warned=0
for src in "${FILES[@]}"; do
  tag="$(echo "$src" | tr '/.' '__')"
  log="$WORK/log/$tag.log"
  read -r rc secs <"$WORK/log/$tag.rc" || { rc=1; secs=0; }
  nwarn="$(grep -cE '(^|[^[:alpha:]])[Ww]arning([^[:alpha:]]|$)' "$log" || true)"
  if [ "$rc" -ne 0 ]; then
    status="FAILED"
    failed=$((failed + 1))
  elif [ "$nwarn" -gt 0 ]; then
    status="ok, $nwarn warning(s)"
    warned=$((warned + 1))
    if [ "${NVCC_CHECK_WERROR:-0}" = 1 ]; then
      status="FAILED (warnings)"
      failed=$((failed + 1))
    fi
  else
    status="ok"
  fi
  printf '  %-40s %s (%ss)\n' "$src" "$status" "$secs"
  if [ "$rc" -ne 0 ] || [ "$nwarn" -gt 0 ]; then
    sed 's/^/      /' "$log"
  elif [ "${NVCC_CHECK_VERBOSE:-0}" = 1 ]; then
    # ptxas -v: one "Compiling entry function" line, then the register/spill/smem lines.
    grep -E "Function properties|spill|Used [0-9]+ registers" "$log" | "$DEMANGLE" |
      sed -e 's/^ *ptxas info *: //' -e 's/^/      /' || true
  fi
done

# The register table: per kernel (entry function) its registers, stack frame and spills, from the
# ptxas lines of every log ("Compiling entry function 'X'", "Function properties for X", then
# "N bytes stack frame, N bytes spill stores, N bytes spill loads" and "Used N registers").
TABLE="$WORK/registers.tsv"
for src in "${FILES[@]}"; do
  tag="$(echo "$src" | tr '/.' '__')"
  awk -v file="$(basename "$src")" '
    /Compiling entry function/ { split($0, q, "\047"); entry = q[2]; next }
    /Function properties for/ { fn = $NF; next }
    /bytes stack frame/ { stack[fn] = $1; st[fn] = $5; ld[fn] = $9; next }
    /Used [0-9]+ registers/ { match($0, /Used [0-9]+ registers/);
                              regs = substr($0, RSTART + 5, RLENGTH - 15);
                              if (entry != "") { print file "\t" entry "\t" regs; entry = "" } }
    END { for (f in stack) print "#props\t" f "\t" stack[f] "\t" st[f] "\t" ld[f] }
  ' "$WORK/log/$tag.log"
done >"$WORK/raw.tsv"
# Join the registers of each entry with its properties, demangle, shorten the names.
awk -F '\t' '
  $1 == "#props" { stack[$2] = $3; st[$2] = $4; ld[$2] = $5; next }
  { file[NR] = $1; fn[NR] = $2; regs[NR] = $3; order[++n] = NR }
  END { for (i = 1; i <= n; ++i) { r = order[i];
          printf "%s\t%s\t%s\t%s\t%s\t%s\n", regs[r], stack[fn[r]] + 0, st[fn[r]] + 0,
                 ld[fn[r]] + 0, file[r], fn[r] } }
' "$WORK/raw.tsv" | sort -t "$(printf '\t')" -k1,1nr -k5,5 >"$WORK/joined.tsv"
cut -f6 "$WORK/joined.tsv" | "$DEMANGLE" |
  sed -e 's/fusedbn::cuda:://g' -e 's/(anonymous namespace):://g' -e 's/c10:://g' \
      -e 's/void //' -e 's/(.*$//' >"$WORK/names.txt"
paste "$WORK/joined.tsv" "$WORK/names.txt" | cut -f1-5,7 >"$TABLE"
kernels="$(wc -l <"$TABLE")"
spilled="$(awk -F '\t' '$3 > 0 || $4 > 0' "$TABLE" | wc -l)"
echo "nvcc_check: registers per kernel (sm_${ARCH}, ${kernels} kernels; stack and spills in bytes):"
printf '  %5s %5s %6s %6s  %-22s %s\n' regs stack spillS spillL file kernel
awk -F '\t' '{ printf "  %5s %5s %6s %6s  %-22s %s\n", $1, $2, $3, $4, $5, $6 }' "$TABLE"
if [ -n "${NVCC_CHECK_TABLE:-}" ]; then cp "$TABLE" "$NVCC_CHECK_TABLE"; fi
stacked="$(awk -F '\t' '$2 > 0 && $3 == 0 && $4 == 0' "$TABLE" | wc -l)"
if [ "$stacked" -gt 0 ]; then
  echo "nvcc_check: $stacked kernel(s) with a stack frame (local memory) but no spill:"
  awk -F '\t' '$2 > 0 && $3 == 0 && $4 == 0 { printf "    %s (%s registers, stack %s)\n", \
      $6, $1, $2 }' "$TABLE"
fi
spill_policy="${NVCC_CHECK_SPILLS:-fail}"
spill_ok=0
case "$spill_policy" in
  warn) spill_ok=1 ;;
  fail) [ "$spilled" -eq 0 ] && spill_ok=1 ;;
  *[!0-9]*|'') echo "nvcc_check: NVCC_CHECK_SPILLS must be fail, warn or a number, got '$spill_policy'" >&2
    exit 2 ;;
  *) [ "$spilled" -le "$spill_policy" ] && spill_ok=1 ;;
esac
if [ "$spilled" -gt 0 ]; then
  if [ "$spill_ok" -eq 1 ]; then
    echo "nvcc_check: $spilled kernel(s) spill (allowed: NVCC_CHECK_SPILLS=$spill_policy):"
  else
    echo "nvcc_check: FAILED: $spilled kernel(s) spill (NVCC_CHECK_SPILLS=$spill_policy):"
  fi
  awk -F '\t' '$3 > 0 || $4 > 0 { printf "    %s (%s registers, stack %s, spill stores %s, " \
      "loads %s)\n", $6, $1, $2, $3, $4 }' "$TABLE"
fi

total="${#FILES[@]}"
echo "nvcc_check: $((total - failed))/$total compiled, $failed failed, $warned with warnings," \
  "$spilled kernel(s) spilling"
[ "$failed" -eq 0 ] && [ "$spill_ok" -eq 1 ]
