#!/usr/bin/env bash
# GPU checks of issue 10, for a machine with a CUDA GPU (the `device` tool, when one is lent).
# Run from the repository root:  bash bench/gpu_check.sh   (PYTHON=... to pick the interpreter)
#
# 1. installs longctx with its test and cuda extras (flash-attn) into the interpreter's
#    environment; without network or a matching flash-attn wheel the install of the extra fails,
#    which is reported, and the flash tests then skip while the rest runs;
# 2. runs the CUDA tests (tests/test_cuda.py): flash-attn forward/backward with lse, bf16
#    kernels, a bf16 training step, ring attention over NCCL on 2 GPUs;
# 3. measures (python -m longctx.bench.gpu, ~10 min on one H100/H200-class GPU): attention
#    forward+backward TFLOP/s at 32k vs the bf16 GEMM rate, the longest Llama-3-8B-shaped
#    training sequence with ZeRO-3 offload + tiled loss + tiled MLP, tokens/s at 32k; writes
#    bench/results/gpu.json and rebuilds bench/results/REPORT.md.
# Everything it prints is also in $OUT/gpu_check.log when OUT is set (the device tool's folder).
set -uo pipefail
PYTHON=${PYTHON:-python3}
LOG=${OUT:-/tmp}/gpu_check.log
export DS_ACCELERATOR=cuda RAY_USAGE_STATS_ENABLED=0
exec > >(tee "$LOG") 2>&1

"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print(torch.__version__, torch.cuda.get_device_name())" \
  || { echo "gpu_check: torch has no CUDA device here"; exit 1; }
"$PYTHON" -m pip install -q -e ".[test]" || { echo "gpu_check: installing longctx failed"; exit 1; }
"$PYTHON" -m pip install -q -e ".[cuda]" --no-build-isolation \
  || echo "gpu_check: the cuda extra (flash-attn) did not install; flash tests will skip"

"$PYTHON" -m pytest -q -rs tests/test_cuda.py
tests_rc=$?

timeout 900 "$PYTHON" -m longctx.bench.gpu "$@"
bench_rc=$?
"$PYTHON" -m longctx.bench.report
[ -n "${OUT:-}" ] && cp bench/results/gpu.json "$OUT/" 2>/dev/null
echo "gpu_check: tests rc=$tests_rc bench rc=$bench_rc"
exit $(( tests_rc || bench_rc ))
