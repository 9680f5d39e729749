#!/usr/bin/env bash
# Everything that needs an NVIDIA GPU, in one run of under 8 minutes (`make gpu-check`;
# docs/design.md, Benchmarks):
#
#   1. build angular._C with its CUDA kernels, in place (setup.py build_ext --inplace)
#   2. the CUDA tests: pytest -m cuda tests/test_fused_cuda.py (and the ops API / property suites)
#   3. the benchmarks: benchmarks/bench_margin.py --device cuda
#
# and leaves every result in one folder: the first argument, else $OUT, else ./gpu-results
# (environment.txt, build.log, pytest_cuda.log, pytest_cuda.xml, bench_margin.{json,md}, ...).
# A short table of the steps comes last.
#
# Python: $PYTHON if set, else .venv/bin/python when it has torch, else python3 (a GPU machine
# usually has torch preinstalled and may not reach a package index: nothing is installed here;
# missing pytest only skips the tests). The repository goes on PYTHONPATH, so no install is needed.
# Each step runs under `timeout`, within an overall deadline (GPU_CHECK_DEADLINE_S, default 470 s).
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

out_dir=${1:-${OUT:-./gpu-results}}
mkdir -p "$out_dir"
out_dir=$(cd "$out_dir" && pwd)
deadline=${GPU_CHECK_DEADLINE_S:-470}
start=$(date +%s)
summary=()

say() { echo "[gpu-check $(($(date +%s) - start)) s] $*" | tee -a "$out_dir/gpu_check.log"; }

# run_step NAME CAP LOG COMMAND...: runs COMMAND under timeout min(CAP, time left), output to LOG
# (and the terminal), and records NAME, its status and duration for the table.
run_step() {
  local name=$1 cap=$2 log=$3
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
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log"
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
  echo
  echo "gpu-check results in $out_dir:"
  printf '%-12s %-26s %8s\n' "step" "status" "seconds"
  local row name status took
  for row in "${summary[@]}"; do
    IFS='|' read -r name status took <<<"$row"
    printf '%-12s %-26s %8s\n' "$name" "$status" "$took"
  done
  if [ -f "$out_dir/bench_margin.md" ]; then
    echo
    echo "benchmark headline ($out_dir/bench_margin.md):"
    awk '/^### Headline/ { on = 1 } on && /^#/ && !/^### Headline/ { exit } on' \
      "$out_dir/bench_margin.md" | head -n 30
  fi
  echo
  echo "total $(($(date +%s) - start)) s"
}

# --- Python and environment --------------------------------------------------------------------
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
  print_summary
  exit 1
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
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
} >"$out_dir/environment.txt" 2>&1
cat "$out_dir/environment.txt"

# --- 1. Build ----------------------------------------------------------------------------------
if cuda_env=$(bash scripts/check_cuda_build.sh --env); then
  eval "$cuda_env"
else
  say "no CUDA toolkit found; the build will have no CUDA kernels"
fi
arch=$("$python" -c "
import torch
major, minor = torch.cuda.get_device_capability(0) if torch.cuda.is_available() else (9, 0)
print(f'{major}.{minor}')
" 2>/dev/null || echo 9.0)
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
build_ok=0
if ANGULAR_BUILD_CUDA=1 ANGULAR_REQUIRE_EXTENSION=1 run_step build 240 "$out_dir/build.log" \
  "$python" setup.py build_ext --inplace; then
  build_ok=1
  "$python" -c "import angular.ops as o; print('angular backend:', o.backend())" 2>&1 |
    tee -a "$out_dir/build.log"
fi

# --- 2. CUDA tests -----------------------------------------------------------------------------
# The fused-kernel CUDA tests, plus the other suites with CUDA cases whose imports this Python has
# (only the fused ones are sure to: they need torch and pytest alone).
test_files=(tests/test_fused_cuda.py tests/test_ops_api.py)
# The reliability folder's conftest imports the pipeline's library (yaml, PIL, tqdm, ...).
if "$python" -c "import hypothesis, angular.training" >/dev/null 2>&1; then
  test_files+=(tests/reliability/test_ops_properties.py tests/reliability/test_ops_invalid_input.py)
fi
if [ "$build_ok" = 1 ] && "$python" -c "import pytest" >/dev/null 2>&1; then
  ANGULAR_REQUIRE_EXTENSION=1 run_step cuda-tests 150 "$out_dir/pytest_cuda.log" \
    "$python" -m pytest -q -ra -m cuda -p no:cacheprovider --junitxml="$out_dir/pytest_cuda.xml" \
    "${test_files[@]}"
elif [ "$build_ok" = 1 ]; then
  summary+=("cuda-tests|not run (no pytest)|0")
else
  summary+=("cuda-tests|not run (build failed)|0")
fi

# --- 3. Benchmarks (whatever the tests said: the numbers are still worth having) --------------
# bench_margin stops starting configurations after --time-budget and stops compiling after
# --compile-budget; both are fitted to the time left, keeping a minute to start up and write.
left=$((deadline - ($(date +%s) - start)))
bench_budget=$((left - 60 < 200 ? left - 60 : 200))
compile_budget=$((bench_budget / 2 < 90 ? bench_budget / 2 : 90))
if [ "$bench_budget" -lt 30 ]; then
  summary+=("benchmark|not run (deadline)|0")
else
  run_step benchmark "$left" "$out_dir/bench_margin.log" \
    "$python" benchmarks/bench_margin.py --device cuda --out "$out_dir" \
    --time-budget "$bench_budget" --compile-budget "$compile_budget"
fi

print_summary | tee -a "$out_dir/gpu_check.log"
for row in "${summary[@]}"; do
  case $row in *"|ok|"*) ;; *) exit 1 ;; esac
done
exit 0
