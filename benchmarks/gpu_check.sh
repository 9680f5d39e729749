#!/usr/bin/env bash
# Everything that needs an NVIDIA GPU, in one run of under 9 minutes on an H100/H200 with 16 cores
# (`make gpu-check`):
#
#   1. build angular.ops._C with its CUDA kernels, in place, for this card's architecture only
#   2. the CUDA tests: pytest -m cuda over tests/ops/test_fused_cuda.py, the ops API and property
#      suites, and, where they exist, the fused linear op's and the distributed (NCCL) head's tests
#   3. the benchmarks: benchmarks/bench_margin.py --device cuda (it rewrites its JSON and Markdown
#      after each configuration, so a timeout keeps what was measured), and
#      benchmarks/bench_linear.py where it exists
#
# Results go to one folder: the first argument, else $OUT, else ./gpu-results. It receives at most
# 8 files: gpu_check.log (this run's log and summary), logs.tar.gz (environment, build and pytest
# logs, the JUnit XML), bench_margin.{json,md}, speedup.png and bench_linear.{json,md}. The
# summary table comes last on stdout.
#
# Without a GPU the script stops at once (exit 2). `gpu_check.sh --dry-run` (or GPU_CHECK_DRY_RUN=1)
# walks the same steps on a CPU machine instead, each in a cheap form (no build; the tests collected
# but not run; the benchmarks on a tiny CPU grid with the same options), so that a step whose file,
# option or import went stale fails where CI sees it (tests/benchmarks/test_gpu_check.py).
#
# Python: $PYTHON if set, else .venv/bin/python when it has torch, else python3 (a GPU machine
# usually has torch preinstalled and may not reach a package index: nothing is installed here;
# missing pytest only skips the tests). The repository goes on PYTHONPATH, so no install is needed.
# Each step runs under `timeout`, within an overall deadline (GPU_CHECK_DEADLINE_S, default 480 s).
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

dry_run=${GPU_CHECK_DRY_RUN:-0}
if [ "${1:-}" = "--dry-run" ]; then
  dry_run=1
  shift
fi
out_dir=${1:-${OUT:-./gpu-results}}
mkdir -p "$out_dir"
out_dir=$(cd "$out_dir" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")  # logs, bundled into logs.tar.gz at the end
trap 'rm -rf "$work"' EXIT
deadline=${GPU_CHECK_DEADLINE_S:-480}
start=$(date +%s)
summary=()
log="$out_dir/gpu_check.log"
: >"$log"

say() { echo "[gpu-check $(($(date +%s) - start)) s] $*" | tee -a "$log"; }

# run_step NAME CAP LOGFILE COMMAND...: runs COMMAND under timeout min(CAP, time left), output to
# LOGFILE (and the terminal), and records NAME, its status and duration for the table.
run_step() {
  local name=$1 cap=$2 step_log=$3
  shift 3
  local left=$((deadline - ($(date +%s) - start)))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 10 ]; then
    summary+=("$name|not run (deadline)|0")
    say "$name: not run, the ${deadline} s deadline is spent"
    return 1
  fi
  say "$name (timeout ${limit} s): $*"
  local t0 status
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$step_log"
  status=${PIPESTATUS[0]}
  local took=$(($(date +%s) - t0))
  case $status in
    0) summary+=("$name|ok|$took") ;;
    124 | 137) summary+=("$name|TIMEOUT after ${limit} s|$took") ;;
    *) summary+=("$name|FAILED (exit $status)|$took") ;;
  esac
  say "$name: exit $status in $took s"
  return "$status"
}

print_summary() {
  if [ -f "$out_dir/bench_margin.md" ]; then
    echo
    echo "benchmark headline ($out_dir/bench_margin.md):"
    awk '/^### Headline/ { on = 1 } on && /^#/ && !/^### Headline/ { exit } on' \
      "$out_dir/bench_margin.md" | head -n 30
  fi
  echo
  echo "gpu-check results in $out_dir$([ "$dry_run" = 1 ] && echo ' (DRY RUN: nothing measured)'):"
  printf '%-14s %-26s %8s\n' "step" "status" "seconds"
  local row name status took
  for row in "${summary[@]}"; do
    IFS='|' read -r name status took <<<"$row"
    printf '%-14s %-26s %8s\n' "$name" "$status" "$took"
  done
  echo "total $(($(date +%s) - start)) s"
}

# Everything but the headline results goes into one archive; at most 8 files stay under $out_dir.
finish() {
  local code=$1
  tar -czf "$out_dir/logs.tar.gz" -C "$work" . 2>/dev/null || say "could not bundle the logs"
  print_summary | tee -a "$log"
  local files
  files=$(find "$out_dir" -type f | wc -l)
  if [ "$files" -gt 8 ]; then
    echo "gpu-check: $files files under $out_dir (more than 8)" | tee -a "$log"
    code=1
  fi
  exit "$code"
}

# --- Python, GPU and environment ---------------------------------------------------------------
python=""
for candidate in "${PYTHON:-}" "$repo/.venv/bin/python" python3 python; do
  if [ -n "$candidate" ] && "$candidate" -c "import torch" >/dev/null 2>&1; then
    python=$candidate
    break
  fi
done
if [ -z "$python" ]; then
  say "no Python with torch found (set PYTHON); nothing can run"
  summary+=("environment|FAILED (no torch)|0")
  finish 1
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

if [ "$dry_run" != 1 ] && ! "$python" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  say "STOP: torch.cuda.is_available() is False with $python (torch $("$python" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)' 2>&1)); this script needs an NVIDIA GPU. Use --dry-run to walk the steps on a CPU."
  summary+=("environment|FAILED (no CUDA device)|0")
  finish 2
fi

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
  echo "python: $python ($("$python" --version 2>&1))"
  "$python" -c "
import torch
print('torch:', torch.__version__, 'built for CUDA', torch.version.cuda)
print('cuda available:', torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print('device:', p.name, f'sm_{p.major}{p.minor}', f'{p.total_memory / 2**30:.0f} GiB', p.multi_processor_count, 'SMs')
"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
  nvcc --version 2>&1 | tail -n 2 || true
} >"$work/environment.txt" 2>&1
cat "$work/environment.txt"

# --- 1. Build ----------------------------------------------------------------------------------
if cuda_env=$(bash scripts/check_cuda_build.sh --env); then
  eval "$cuda_env"
else
  say "no CUDA toolkit found; the build will have no CUDA kernels"
fi
# This card's architecture only: one arch to compile, not torch's whole list.
if [ "$dry_run" = 1 ]; then
  arch=9.0
else
  arch=$("$python" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
fi
export TORCH_CUDA_ARCH_LIST=$arch
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
say "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
build_ok=0
build=("$python" setup.py build_ext --inplace)
if [ "$dry_run" = 1 ]; then
  # Not built (it would replace the in-place CPU extension); the command is checked to exist.
  build=(test -f setup.py)
fi
if ANGULAR_BUILD_CUDA=1 ANGULAR_REQUIRE_EXTENSION=1 run_step build 240 "$work/build.log" \
  "${build[@]}"; then
  build_ok=1
  "$python" -c "import angular.ops as o; print('angular backend:', o.backend())" 2>&1 |
    tee -a "$work/build.log"
fi

# --- 2. CUDA tests -----------------------------------------------------------------------------
# The fused-kernel CUDA tests, plus the other suites with CUDA cases whose imports this Python has
# (only the fused ones are sure to: they need torch and pytest alone), plus those other work adds
# (the fused linear op, the per-row margin ops, the sharded ops, and the sharded head on NCCL with
# W = the number of GPUs, the one op's launch count, the fused linear op in shard mode, the Triton
# tiled kernel) where their files exist.
test_files=(tests/ops/test_fused_cuda.py tests/ops/test_ops_api.py)
# The reliability folder's conftest imports the pipeline's library (yaml, PIL, tqdm, ...).
if "$python" -c "import hypothesis, angular.train" >/dev/null 2>&1; then
  test_files+=(tests/ops/test_ops_properties.py tests/ops/test_ops_invalid_input.py)
fi
for optional in tests/ops/test_fused_linear.py tests/ops/test_adaptive_ops.py tests/distributed/test_sharded_ops.py \
  tests/distributed/test_nccl.py tests/ops/test_loss_op_cuda.py tests/ops/test_sharded_linear.py \
  tests/ops/test_triton_linear.py; do
  if [ -f "$optional" ]; then test_files+=("$optional"); fi
done
tests=("$python" -m pytest -q -ra -m cuda -p no:cacheprovider --junitxml="$work/pytest_cuda.xml")
if [ "$dry_run" = 1 ]; then
  tests+=(--collect-only)
fi
if [ "$build_ok" = 1 ] && "$python" -c "import pytest" >/dev/null 2>&1; then
  ANGULAR_REQUIRE_EXTENSION=1 run_step cuda-tests 150 "$work/pytest_cuda.log" \
    "${tests[@]}" "${test_files[@]}"
elif [ "$build_ok" = 1 ]; then
  summary+=("cuda-tests|not run (no pytest)|0")
else
  summary+=("cuda-tests|not run (build failed)|0")
fi

# --- 3. Benchmarks (whatever the tests said: the numbers are still worth having) --------------
# bench_margin stops starting configurations after --time-budget and stops compiling after
# --compile-budget; both are fitted to the time left, keeping time for bench_linear and the end.
linear_cap=0
# Three providers (fused_linear, unfused, triton_linear, whose kernels compile on first call) at
# C = 1M, the issue's shape.
if [ -f benchmarks/bench_linear.py ]; then linear_cap=150; fi
left=$((deadline - ($(date +%s) - start)))
bench_budget=$((left - 60 - linear_cap < 240 ? left - 60 - linear_cap : 240))
compile_budget=$((bench_budget / 2 < 90 ? bench_budget / 2 : 90))
margin=("$python" benchmarks/bench_margin.py --device cuda --out "$out_dir"
  --time-budget "$bench_budget" --compile-budget "$compile_budget")
if [ "$dry_run" = 1 ]; then
  # The same options on a tiny CPU grid (explicit --B/--C/--dtypes/... replace the default grid).
  margin=("$python" benchmarks/bench_margin.py --device cpu --out "$out_dir"
    --time-budget 60 --compile-budget 30 --B 4 --C 64 --dtypes fp32 --presets arcface
    --ops loss --passes fwd --providers fused,reference --min-run-time 0.01 --threads 1)
fi
if [ "$bench_budget" -lt 30 ]; then
  summary+=("benchmark|not run (deadline)|0")
else
  run_step benchmark $((left - linear_cap)) "$work/bench_margin.log" "${margin[@]}"
fi

if [ -f benchmarks/bench_linear.py ]; then
  linear=("$python" benchmarks/bench_linear.py)
  help=$("$python" benchmarks/bench_linear.py --help 2>&1 || true)
  if [[ $help == *--device* ]]; then
    linear+=(--device "$([ "$dry_run" = 1 ] && echo cpu || echo cuda)")
  fi
  if [[ $help == *--out* ]]; then linear+=(--out "$work/bench_linear"); fi
  if [[ $help == *--cuda-C* ]]; then linear+=(--cuda-C 1000000); fi
  if [ "$dry_run" = 1 ]; then linear=("$python" benchmarks/bench_linear.py --help); fi
  run_step bench-linear "$linear_cap" "$work/bench_linear.log" "${linear[@]}"
  # Its headline files next to bench_margin's (at most one JSON and one Markdown file).
  for ext in json md; do
    found=$(find "$work/bench_linear" -maxdepth 1 -name "*.$ext" 2>/dev/null | head -n 1)
    if [ -n "$found" ]; then cp "$found" "$out_dir/bench_linear.$ext"; fi
  done
fi

status=0
for row in "${summary[@]}"; do
  case $row in *"|ok|"*) ;; *) status=1 ;; esac
done
finish "$status"
