#!/usr/bin/env bash
# The GPU figures of docs/performance.md, in one run (about 7 minutes on an H200 without the
# compile part, which was added after and is not timed yet):
#   CELLSEG_DATA=DIR bash docs/gpu_bench.sh [OUT]     (DIR holds sstem: cellseg data fetch sstem)
# Each command's JSON goes to OUT/log.txt after a '### name: command' line; a command that
# fails or passes its time limit is logged and the next one runs. BUDGET (seconds, default
# 420) stops starting new commands once it is spent; PARTS (default "compile epoch protocol
# train check plugins") picks the parts to run; STEPS (names, space-separated) runs only those steps.
set -u
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-${OUT:-gpu-results}}
mkdir -p "$out"
log="$out/log.txt"
budget=${BUDGET:-420}
parts=" ${PARTS:-compile epoch protocol train check plugins} "
want() { [[ $parts == *" $1 "* ]]; }
steps=" ${STEPS:-} "
step() {  # step NAME LIMIT_S ARGS...: one cellseg command, logged
    local name=$1 limit=$2
    shift 2
    [[ -z ${STEPS:-} || $steps == *" $name "* ]] || return 0
    if (( SECONDS > budget )); then echo "### $name: skipped (budget spent)" >> "$log"; return; fi
    echo "### $name: cellseg $* (t=${SECONDS}s)" >> "$log"
    # -P: the checkout's cellseg_plugins/ (no cli/ in it) must not shadow the installed package
    timeout "$limit" python3 -P -m cellseg_plugins.cli.main "$@" >> "$log" 2> "$out/err.txt"
    local rc=$?
    [ $rc -eq 0 ] || { echo "rc=$rc"; tail -n 3 "$out/err.txt"; } >> "$log"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, segmentation_models_pytorch as smp; print('torch', torch.__version__, 'smp', smp.__version__, torch.cuda.get_device_name())"
} >> "$log" 2>&1

# The engine against a bare loop; device-resident data against the DataLoader; precisions.
E=(--epoch --data sstem --batch 8 --device cuda --json)
if want epoch; then
step epoch_w8_resident 120 bench "classic_unet" "${E[@]}"
step epoch_w8_loader 120 bench "classic_unet" "${E[@]}" --no-data-on-device
step epoch_w64_resident 120 bench "classic_unet(width=64)" "${E[@]}"
step epoch_w64_fp32 120 bench "classic_unet(width=64)" "${E[@]}" --precision fp32
fi

# torch.compile on the launch-bound 8…128 U-Net: inductor's default mode and CUDA graphs
# (reduce-overhead), against the eager figures above (issue #11: resident ≥ 5× the loader).
if want compile; then
step epoch_w8_compile 240 bench "classic_unet" "${E[@]}" --compile
step epoch_w8_cudagraphs 240 bench "classic_unet" "${E[@]}" --compile --compile-mode reduce-overhead
step epoch_w8_lfa_compile 300 bench "classic_unet+lfa(m=7)" "${E[@]}" --compile
fi

# One model's protocol throughput (issue #11: under 30 minutes): ten 30-epoch runs of the
# 8…128 U-Net (5 folds × 2 seeds) sharing the GPU through cellseg cv --jobs 10, eager and
# with CUDA graphs. Logged: the call's wall time, and the median epoch of the runs (from their
# metrics.csv, epoch 1 with its compile left out) with what it gives: 10 runs / that epoch.
if want protocol; then
for mode in eager cudagraphs; do
    extra=(); [ $mode = cudagraphs ] && extra=(--compile --compile-mode reduce-overhead)
    cv="/tmp/cv_$mode" t0=$SECONDS
    step cv_$mode 300 cv classic_unet --data sstem --classes sstem4 --batch-size 8 --epochs 30 \
        --folds 5 --seeds 2 --jobs 10 --threads 1 --device cuda --out "$cv" "${extra[@]}"
    [ -d "$cv" ] && python3 - "$cv" $((SECONDS - t0)) >> "$log" <<'PY'
import csv, pathlib, statistics, sys
runs = sorted(pathlib.Path(sys.argv[1]).glob("fold*_seed*/metrics.csv"))
epochs = [float(r["seconds"]) for p in runs for r in list(csv.DictReader(open(p)))[1:]]
if epochs:
    m = statistics.median(epochs)
    print(f"{len(runs)} runs, wall {sys.argv[2]} s, median epoch {m:.3f} s, "
          f"{len(runs) / m:.2f} epochs/s together, protocol (22 500 epochs) {22500 * m / len(runs) / 60:.0f} min")
PY
    rm -rf "$cv"
done
fi

# cellseg train, eval and predict end to end on the GPU: the LFA paper's U-Net, 30 epochs.
if want train; then
run="$out/run"
step train 150 train "classic_unet(width=64)" --preset lfa --data sstem --epochs 30 --device cuda --out "$run"
tail -n 2 "$run/metrics.csv" >> "$log" 2>&1
step eval 60 eval "$run/best.pt" --device cuda --json
step predict 60 predict "$run/best.pt" "$CELLSEG_DATA/sstem/stack1/raw/00.tif" --device cuda --out "$out/pred"
rm -rf "$run/"*.pt "$out/pred"
fi

# Every plugin's CUDA path against its CPU path (fp32), and bf16 finiteness.
if want check && (( SECONDS <= budget )); then
    echo "### gpu_check: python3 docs/gpu_check.py (t=${SECONDS}s)" >> "$log"
    timeout 120 python3 "$here/gpu_check.py" >> "$log" 2>> "$out/err.txt" || echo "rc=$?" >> "$log"
fi

# Plugin step costs at 256², batch 8, on the papers' U-Nets (bf16 autocast is cuda's default).
S=(--size 256 --batch 8 --device cuda --json)
if want plugins; then
step lfa 90 bench "classic_unet(width=64)+lfa(m=7)" --vs "classic_unet(width=64)" "${S[@]}"
step feedback_self 90 bench "classic_unet+feedback_self" --vs classic_unet "${S[@]}"
step feedback_convlstm 90 bench "classic_unet+feedback_convlstm" --vs classic_unet "${S[@]}"
step frem 90 bench "classic_unet(width=32,se=True)+frem(B=0.015625,X=250)" --vs "classic_unet(width=32,se=True)" "${S[@]}"
fi
echo "### done (t=${SECONDS}s)" >> "$log"
