#!/usr/bin/env bash
# The study runs of results/*-h200, in one device run: each study file in turn at one scale,
# JOBS runs sharing the GPU, until BUDGET seconds (default 540) are spent.
#   CELLSEG_DATA=DIR bash docs/gpu_study.sh OUT [STUDY ...]    (default: sstem5 sstem4 smp)
# A study cut off by the budget keeps its finished runs (cellseg study run resumes). Their
# small files (test.json, metrics.csv, config.json, study.json; no checkpoints) are packed
# into OUT/results.tgz, the log into OUT/study.log. cellseg must be installed (a wheel; on a
# machine without it: pip install --no-deps --target DIR cellseg-*.whl and PYTHONPATH=DIR);
# python3 -P keeps the checkout's source folders from shadowing the installed package.
# ROWS (optional) picks rows: shell patterns separated by ';', as study run's --rows.
set -u
out=${1:?usage: CELLSEG_DATA=DIR bash docs/gpu_study.sh OUT [STUDY ...]}
shift
studies=("$@")
[ $# -eq 0 ] && studies=(sstem5 sstem4 smp)
budget=${BUDGET:-540} jobs=${JOBS:-12} scale=${SCALE:-cpu} tag=${TAG:-h200}
rows=()
IFS=';' read -ra pats <<< "${ROWS:-}"
for p in "${pats[@]}"; do rows+=(--rows "$p"); done
mkdir -p "$out"
log="$out/study.log"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__)"; } >> "$log" 2>&1
for s in "${studies[@]}"; do
    left=$(( budget - SECONDS ))
    (( left > 30 )) || { echo "### $s: skipped (budget spent)" >> "$log"; continue; }
    echo "### $s: --jobs $jobs --threads 1, ${left}s left (t=${SECONDS}s)" >> "$log"
    timeout -k 10 "$left" python3 -P -m cellseg_plugins.cli.main study run "studies/$s.toml" \
        --scale "$scale" --jobs "$jobs" --threads 1 --no-report "${rows[@]}" \
        --out "results/$s-$scale-$tag" >> "$log" 2>&1
    echo "rc=$? (t=${SECONDS}s)" >> "$log"
    nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader >> "$log" 2>&1
done
pkill -f "cellseg_plugins" 2>/dev/null
dirs=("${studies[@]/#/results/}")
tar czf "$out/results.tgz" $(find "${dirs[@]/%/-$scale-$tag}" 2>/dev/null \
    \( -name test.json -o -name metrics.csv -o -name config.json -o -name study.json \))
echo "### packed $(tar tzf "$out/results.tgz" | grep -c test.json) finished runs (t=${SECONDS}s)" >> "$log"
