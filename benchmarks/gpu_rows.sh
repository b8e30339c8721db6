#!/usr/bin/env bash
# The CUDA rows of issue 13 in one prepared run (about 8-10 minutes on one H100; each step has
# its own time limit). Run from the repository root on a machine with one GPU:
#
#     OUT=/path/to/results bash benchmarks/gpu_rows.sh
#
# Needs torch (with CUDA) and numpy; Ray, MLflow and ema-pytorch are optional: without Ray the
# "1-GPU Ray Train vs plain loop" row says it is skipped, without ema-pytorch (which the
# training loop imports) ray_overhead.py is skipped. Every script writes its table to
# $OUT/<script>.txt and its records to $OUT/<script>.json; a failing step does not stop the rest.
set -u
OUT=${OUT:-gpu-results}
PY=${PYTHON:-python}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.__version__, torch.cuda.get_device_name())" | tee "$OUT/device.txt" || exit 1

step() {  # step NAME SECONDS ARGS...: one benchmark with a time limit
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($limit s max): $*"
    timeout "$limit" $PY "benchmarks/$name.py" --device cuda "$@" --out "$OUT/$name.json" \
        2>&1 | tee "$OUT/$name.txt" | tail -n 40
}

# 1. mef-cifar at batch 64: images/s, FLOP utilisation against the GPU's dense-conv peak
#    measured in the same worker, peak memory (torch.cuda.max_memory_allocated), the
#    release-equivalent row, a torch.compile row, the profile, and the matrix exponential.
step train_throughput 300 --steps 10 --warmup 3 --profile --compile
# 2. FPI at K = 1000, d = 3072 on the GPU (iteration and full solves, float64).
step fpi_scaling 150 --solve-repeats 1
# 3. 1-GPU Ray Train against the plain loop (skips itself when Ray is missing).
if $PY -c "import ema_pytorch" 2>/dev/null; then
    step ray_overhead 180 --quick
else
    echo "=== ray_overhead skipped: ema-pytorch (imported by the training loop) is not installed"
fi
# 4. Generation and NF augmentation on the GPU, and the classifier epoch with the NF pool.
step generation_throughput 120 --quick
step augment_cost 180 --quick
echo "results in $OUT"
