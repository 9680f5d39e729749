#!/usr/bin/env bash
# Compile and link the CUDA build of angular.ops._C without a GPU (`make cuda-check`; CI runs it), then
# load the result, so that a .cu file that does not compile, or a missing symbol, fails.
#
# Builds in a temporary folder: the in-place CPU extension (angular/ops/_C*.so) is left alone.
# Needs nvcc and a CUDA build of torch (pip's cu130 build has the CUDA runtime libraries).
#
# Environment:
#   CUDA_HOME             toolkit root; default /usr/local/cuda if it has include/cuda_runtime.h,
#                         else the root nvcc reports (nvcc may be a wrapper script elsewhere)
#   TORCH_CUDA_ARCH_LIST  GPU architectures to compile for (default 9.0: H100/H200)
#   PYTHON                interpreter with torch (default .venv/bin/python, else python3)
#   CI, ANGULAR_REQUIRE_EXTENSION
#                         when either is set, a missing nvcc is a failure; otherwise the check
#                         is skipped with a message (exit 0) on machines without a CUDA toolkit.
#
# `check_cuda_build.sh --env` only prints the environment a CUDA build needs here, as shell export
# lines (CUDA_HOME, PATH, CPATH), for other scripts to eval (benchmarks/gpu_check.sh does).
set -euo pipefail
cd "$(dirname "$0")/.."
env_only=0
if [ "${1:-}" = "--env" ]; then env_only=1; fi

strict=0
if [ -n "${CI:-}" ] || [ "${ANGULAR_REQUIRE_EXTENSION:-0}" = "1" ]; then strict=1; fi

PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

has_headers() { [ -n "$1" ] && [ -f "$1/include/cuda_runtime.h" ] && [ -x "$1/bin/nvcc" ]; }

cuda_home=""
if has_headers "${CUDA_HOME:-}"; then
  cuda_home=$CUDA_HOME
elif has_headers /usr/local/cuda; then
  cuda_home=/usr/local/cuda
elif command -v nvcc >/dev/null 2>&1; then
  # nvcc knows its own root even when the nvcc on PATH is a wrapper script or a link.
  top=$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
  if [ -n "$top" ] && has_headers "$(cd "$top" && pwd -P)"; then cuda_home=$(cd "$top" && pwd -P); fi
fi
if [ -z "$cuda_home" ]; then
  if [ "$env_only" = 1 ]; then
    echo "echo 'cuda-check: no CUDA toolkit found (nvcc with its headers; set CUDA_HOME)' >&2"
    exit 1
  fi
  echo "cuda-check: no CUDA toolkit found (nvcc with its headers; set CUDA_HOME)."
  if [ "$strict" = 1 ]; then
    echo "cuda-check: FAILED (CI or ANGULAR_REQUIRE_EXTENSION=1 is set, so the check is required)"
    exit 1
  fi
  echo "cuda-check: skipped"
  exit 0
fi

# torch's CUDA headers include cusparse.h and friends from pip's nvidia-* packages: nvidia/cu13/include
# for CUDA 13 wheels, nvidia/<library>/include for CUDA 12 ones.
extra_includes=$("$PYTHON" - <<'PY' || true
import glob, os, sysconfig
roots = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
found = sorted({d for r in roots for d in glob.glob(os.path.join(r, "nvidia", "*", "include"))})
print(":".join(found))
PY
)

if [ "$env_only" = 1 ]; then
  printf 'export CUDA_HOME=%q\n' "$cuda_home"
  printf 'export PATH=%q\n' "$cuda_home/bin:$PATH"
  printf 'export CPATH=%q\n' "${extra_includes}${CPATH:+:$CPATH}"
  exit 0
fi

build=$(mktemp -d "${TMPDIR:-/tmp}/angular-cuda-check.XXXXXX")
trap 'rm -rf "$build"' EXIT

export CUDA_HOME=$cuda_home
export PATH="$cuda_home/bin:$PATH"
export CPATH="${extra_includes}${CPATH:+:$CPATH}"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export ANGULAR_BUILD_CUDA=1
export ANGULAR_REQUIRE_EXTENSION=1   # a compile error must fail, not fall back
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

echo "cuda-check: nvcc $("$cuda_home/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), CUDA_HOME=$cuda_home, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
echo "cuda-check: sources: $(ls csrc/*.cpp csrc/cpu/*.cpp csrc/cuda/*.cpp csrc/cuda/*.cu | tr '\n' ' ')"
start=$(date +%s)
if ! "$PYTHON" setup.py -q build_ext --build-temp "$build/temp" --build-lib "$build/lib" \
    >"$build/log" 2>&1; then
  grep -E -B2 -A12 "error|Error" "$build/log" | head -n 120 || tail -n 80 "$build/log"
  echo "cuda-check: FAILED to compile the CUDA build ($(( $(date +%s) - start )) s)"
  exit 1
fi
so=$(find "$build/lib" -name '_C*.so' | head -n 1)
if [ -z "$so" ]; then
  tail -n 40 "$build/log"
  echo "cuda-check: FAILED: no angular.ops._C library was produced"
  exit 1
fi
elapsed=$(( $(date +%s) - start ))

# Load the library (no GPU needed): an unresolved symbol or a registration error fails here.
"$PYTHON" - "$so" <<'PY'
import importlib.util
import sys

import torch

spec = importlib.util.spec_from_file_location("angular.ops._C", sys.argv[1])
spec.loader.exec_module(importlib.util.module_from_spec(spec))
has = torch._C._dispatch_has_kernel_for_dispatch_key
# Every op the library defines (csrc/ops.cpp, csrc/sharded_ops.cpp), not a list kept by hand.
ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("angular::"))
if len(ops) < 12:  # the 12 ops of this version; a lost registration file shows up here
    sys.exit(f"cuda-check: FAILED: only {len(ops)} angular ops are registered: {', '.join(ops)}")
missing = [f"{op}/{key}" for op in ops for key in ("CPU", "CUDA") if not has(op, key)]
if missing:
    sys.exit(f"cuda-check: FAILED: no kernel registered for {', '.join(missing)}")
print(f"cuda-check: {len(ops)} ops, each with a CPU and a CUDA kernel")
PY
echo "cuda-check: OK: built $(basename "$so") ($(du -h "$so" | cut -f1)) with CPU and CUDA kernels for sm_${TORCH_CUDA_ARCH_LIST//./} in ${elapsed} s; it loads and registers every angular op on CPU and CUDA"
