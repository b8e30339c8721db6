#!/usr/bin/env bash
# The CUDA rows of issues 13 and 24 in one prepared run, about 6-8 minutes on one H100 (each step
# has its own time limit; the limits add up to 12.8 minutes without Ray, 14.5 with it). Run from the
# repository root on a machine with one GPU:
#
#     OUT=/path/to/results bash benchmarks/gpu_rows.sh
#
# Needs torch (with CUDA), numpy and timm. Ray, MLflow and ema-pytorch are optional: the
# "1-GPU Ray Train vs plain loop" row (ray_overhead.py) needs Ray and ema-pytorch (the training
# loop imports it) and is skipped with a message when either is missing; nothing else imports
# them. Every step writes its table to $OUT/<step>.txt and its records to $OUT/<step>.json (a
# JSON list of flat records); $OUT/device.json names the device and $OUT/steps.json says how
# each step ended (rc 0 = done, 124 = over its time limit, skipped = with the reason). A
# failing step does not stop the rest.
#
# Local check of the script itself (CPU, every step at its smoke-test size, a minute or two):
#     DEVICE=cpu SMOKE=1 OUT=/tmp/gpu-rows bash benchmarks/gpu_rows.sh
set -u
OUT=${OUT:-gpu-results}
PY=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}
SMOKE=${SMOKE:-}
COMPILE=${COMPILE:-1}  # 0: leave out the torch.compile row
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
STEPS="$OUT/steps.jsonl"
: >"$STEPS"

$PY - "$DEVICE" "$OUT/device.json" <<'EOF' || exit 1
import json, sys, importlib.util, torch
device, out = sys.argv[1], sys.argv[2]
if device == "cuda":
    assert torch.cuda.is_available(), "no CUDA device visible to torch (DEVICE=cpu for a local check)"
info = {
    "torch": torch.__version__,
    "device": device,
    "name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
    "optional": {m: importlib.util.find_spec(m) is not None
                 for m in ("ray", "mlflow", "ema_pytorch", "timm")},
}
print(json.dumps(info))
json.dump(info, open(out, "w"), indent=1)
EOF

record() {  # record NAME RC SECONDS [REASON]
    printf '{"step": "%s", "rc": "%s", "seconds": %s, "reason": "%s"}\n' "$1" "$2" "$3" "${4:-}" \
        >>"$STEPS"
}

step() {  # step NAME SCRIPT SECONDS ARGS...: one benchmark with a time limit
    local name=$1 script=$2 limit=$3 t0=$SECONDS rc
    shift 3
    if [ -n "$SMOKE" ]; then  # keep the flags that pick rows, drop the sizes
        local keep=() skip=0 a
        for a in "$@"; do
            case $a in
            --quick) ;;
            --steps | --warmup | --ks | --ds | --solve-repeats | --batch) skip=1 ;;
            --*) skip=0 && keep+=("$a") ;;
            *) [ "$skip" = 1 ] || keep+=("$a") ;;
            esac
        done
        set -- --smoke-test ${keep[@]+"${keep[@]}"}
    fi
    echo "=== $name ($limit s max): benchmarks/$script.py --device $DEVICE $*"
    timeout "$limit" $PY "benchmarks/$script.py" --device "$DEVICE" "$@" --out "$OUT/$name.json" \
        >"$OUT/$name.txt" 2>&1
    rc=$?
    tail -n 40 "$OUT/$name.txt"
    [ "$rc" = 124 ] && echo "=== $name: stopped at its $limit s limit (no records)"
    record "$name" "$rc" $((SECONDS - t0))
}

# 1. mef-cifar at batch 64: images/s, FLOP utilisation against the GPU's dense-conv peak
#    measured in the same worker, peak memory (torch.cuda.max_memory_allocated), the
#    release-equivalent row (Taylor loop with a host sync per term), the profile, and the matrix
#    exponential (torch.linalg.matrix_exp vs nfpi.flows.expm vs the Taylor loop).
step train_throughput train_throughput 150 --steps 6 --warmup 2 --profile
# 2. FPI at K = 1000, d = 3072 on the GPU (iteration rows at K = 100, 1000 and both solves,
#    float64); the K = 100 broadcast row gives the GEMM speedup.
step fpi_scaling fpi_scaling 60 --ks 100 1000 --ds 3072 --solve-repeats 1
# 3. NF augmentation: the classifier epoch with standard augmentation, the NF pool (built in
#    process, without Ray) and NF augmentation online; mef-cifar flow, ResNet-18, 1000 images.
step augment_cost augment_cost 90
# 4. Generation throughput and the per-batch NF augmentation cost.
step generation_throughput generation_throughput 60 --quick
# 5. torch.compile(mef-cifar) at batch 64 (compile time excluded from the step time).
if [ "$COMPILE" = 1 ]; then
    step train_throughput_compile train_throughput 60 --steps 6 --warmup 2 --compile-only
else
    record train_throughput_compile skipped 0 "COMPILE=0"
fi
# 6-7. Issue 24: mef-cifar with and without the invertible backward (optim.invertible_backward:
#    activations rebuilt in backward from each layer's output), at batch 64 and 256: images/s,
#    peak memory (torch.cuda.max_memory_allocated), the time-per-step ratio, the gradients'
#    error against autograd and the rebuilt activations' error over the full depth. The
#    release-equivalent ratio (project / Taylor loop with a host sync per term) is step 1's.
step train_throughput_inv64 train_throughput 150 --steps 6 --warmup 2 --only-extra \
    --invertible-backward
step train_throughput_inv256 train_throughput 200 --batch 256 --steps 4 --warmup 2 --only-extra \
    --invertible-backward
# 8. 1-GPU Ray Train against the plain loop: needs Ray and ema-pytorch.
missing=$($PY -c "import importlib.util as u; \
print(' '.join(m for m in ('ray', 'ema_pytorch') if u.find_spec(m) is None))")
if [ -z "$missing" ]; then
    step ray_overhead ray_overhead 100 --quick
else
    echo "=== ray_overhead skipped: not installed: $missing (the 1-GPU Ray Train row needs both)"
    record ray_overhead skipped 0 "not installed: $missing"
fi

$PY - "$STEPS" "$OUT/steps.json" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
json.dump(rows, open(sys.argv[2], "w"), indent=1)
for r in rows:
    print(f"{r['step']:<26} rc={r['rc']:<8} {r['seconds']:>4} s  {r['reason']}")
EOF
rm -f "$STEPS"
echo "results in $OUT"
