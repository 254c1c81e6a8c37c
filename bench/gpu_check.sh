#!/usr/bin/env bash
# GPU checks of issues 10 and 21, for a machine with a CUDA GPU (the `device` tool, when one is
# lent). Run from the repository root:
#   bash bench/gpu_check.sh             # on the GPU machine (PYTHON=... picks the interpreter)
#   bash bench/gpu_check.sh --dry-run   # anywhere: tiny CPU problems, no installs (CI runs it)
# Without CUDA the dry run is chosen by itself. Other arguments go to `python -m longctx.bench.gpu`
# (e.g. --checks parity attention, --lengths 8192 16384).
#
# 1. (GPU) installs longctx with its test and cuda extras (flash-attn) into the interpreter's
#    environment, without retries; an install that fails (no network, no matching flash-attn
#    wheel) is reported and the run goes on (flash checks then skip);
# 2. (GPU) runs the CUDA tests (tests/test_cuda.py): flash-attn forward/backward with lse, bf16
#    kernels, a bf16 training step, ring attention over NCCL on 2 GPUs;
# 3. runs the checks of bench/gpu.py (its docstring: flash-attn parity against the reference in
#    bf16, packed documents and flash-attn's varlen path, attention TFLOP/s against bf16 GEMM at
#    8k-64k, a ~1B Llama step's tokens/s and MFU at 16k-64k, the same step in transformers +
#    flash-attn 2), each on its own (one failing does not stop the others), writing each
#    check's status to bench/results/gpu.json (the dry run writes $OUT or /tmp instead), then
#    rebuilds bench/results/REPORT.md (GPU run only).
# Everything it prints is also in $OUT/gpu_check.log when OUT is set (the device tool's folder).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DRY=0
ARGS=()
for arg in "$@"; do
  if [ "$arg" = "--dry-run" ]; then DRY=1; else ARGS+=("$arg"); fi
done
if [ "$DRY" = 0 ] && ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_check: torch has no CUDA device here; dry run on tiny CPU problems"
  DRY=1
fi
LOG=${OUT:-/tmp}/gpu_check.log
exec > >(tee "$LOG") 2>&1

if [ "$DRY" = 1 ]; then
  export DS_ACCELERATOR=cpu RAY_USAGE_STATS_ENABLED=0
  echo "gpu_check: dry run: installs and tests/test_cuda.py skipped (the test suite runs it)"
  "$PYTHON" -m longctx.bench.gpu --dry-run --out "${OUT:-/tmp}/gpu_dry_run.json" "${ARGS[@]}"
  bench_rc=$?
  echo "gpu_check: dry run rc=$bench_rc"
  exit $bench_rc
fi

export DS_ACCELERATOR=cuda RAY_USAGE_STATS_ENABLED=0
"$PYTHON" -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
PIP=("$PYTHON" -m pip install -q --retries 0 --timeout 10 --no-build-isolation)
"${PIP[@]}" -e ".[test]" || echo "gpu_check: installing longctx[test] failed; going on"
"${PIP[@]}" -e ".[cuda]" \
  || echo "gpu_check: the cuda extra (flash-attn) did not install; flash checks will skip"
if ! "$PYTHON" -c "import longctx" 2>/dev/null; then  # not installed: import the checkout
  mkdir -p /tmp/gpu_check_path && ln -sfn "$PWD" /tmp/gpu_check_path/longctx
  export PYTHONPATH=/tmp/gpu_check_path${PYTHONPATH:+:$PYTHONPATH}
  echo "gpu_check: longctx imported from this checkout through PYTHONPATH"
fi

timeout 180 "$PYTHON" -m pytest -q -rs tests/test_cuda.py
tests_rc=$?

timeout 540 "$PYTHON" -m longctx.bench.gpu "${ARGS[@]}"
bench_rc=$?
"$PYTHON" -m longctx.bench.report
[ -n "${OUT:-}" ] && cp bench/results/gpu.json "$OUT/" 2>/dev/null
echo "gpu_check: tests rc=$tests_rc bench rc=$bench_rc"
exit $(( tests_rc || bench_rc ))
