#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, with the stripped bench binary in .bin/:
#   bash scripts/gpu-profile.sh [shape] [layers]
# Times every kernel of one served request (a prefill and a few decode steps) with Nsight
# Compute (kernel durations only; clocks left alone), on a random-weight model of the shape cut
# to a few layers, and prints the last decode step's kernels with their share of the step.
# Output: $OUT/ncu.csv.
set -euo pipefail
shape="${1:-llama-3.1-8b}"
layers="${2:-2}"
out="${OUT:-/tmp}"
python3 scripts/gpu_e2e.py "$shape" --no-check --layers "$layers"
dir="/tmp/kiln-$shape-$layers"
# The serving path (greedy tokens picked on the device), one request: a 512-token prompt, then
# decode steps.
ncu --clock-control none --metrics gpu__time_duration.sum --csv --log-file "$out/ncu.csv" \
    .bin/engine bench --model "$dir" --concurrency 1 --prompt-len 512 --gen 6
python3 - "$out/ncu.csv" "$layers" <<'PY'
import csv, sys
rows = [r for r in csv.DictReader(l for l in open(sys.argv[1]) if l.startswith('"'))
        if r["Metric Name"] == "gpu__time_duration.sum"]
# Forwards start with the embedding gather; the last one is the last decode step.
starts = [i for i, r in enumerate(rows) if "embedding" in r["Kernel Name"]]
def show(title, part):
    scale = {"ns": 1e-3, "us": 1.0, "ms": 1e3, "nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3}
    ts = [float(r["Metric Value"].replace(",", "")) * scale[r["Metric Unit"]] for r in part]
    total = sum(ts)
    print(f"\n{title}: {len(part)} kernels, {total:.1f} us of kernel time")
    for r, t in zip(part, ts):
        print(f"  {t:8.1f} us  {100 * t / total:5.1f} %  {r['Kernel Name'][:60]}")
if len(starts) < 4:
    show("all kernels (forwards not found by name)", rows)
else:
    show("prefill (512 tokens)", rows[starts[0]:starts[2]])  # two gathers: ids, then picked rows
    show("last decode step", rows[starts[-2]:])
PY
