#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, with the stripped bench binary in .bin/:
#   [ENGINE=.bin/engine] bash scripts/gpu-profile.sh [shape] [layers] [concurrency]
# Times every kernel of `concurrency` (default 1) served requests (prefills and a few decode
# steps) with Nsight Compute (kernel durations only; clocks left alone), on a random-weight
# model of the shape cut to a few layers, and prints the first forward's kernels and the slowest
# decode-only step's (at concurrency c, a step of up to c rows) with their share of the step.
# Output: $OUT/ncu.csv.
set -euo pipefail
shape="${1:-llama-3.1-8b}"
layers="${2:-2}"
concurrency="${3:-1}"
out="${OUT:-/tmp}"
dir="/tmp/kiln-$shape-$layers"
[ -d "$dir" ] || python3 scripts/gpu_e2e.py "$shape" --no-check --layers "$layers"
# The serving path (greedy tokens picked on the device): 512-token prompts, then $GEN (default
# 6) decode steps each.
ncu --clock-control none --metrics gpu__time_duration.sum --csv --log-file "$out/ncu.csv" \
    "${ENGINE:-.bin/engine}" bench --model "$dir" --concurrency "$concurrency" --prompt-len 512 --gen "${GEN:-6}"
python3 - "$out/ncu.csv" <<'PY'
import csv, sys
SCALE = {"ns": 1e-3, "us": 1.0, "ms": 1e3, "nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3}
rows = [r for r in csv.DictReader(l for l in open(sys.argv[1]) if l.startswith('"'))
        if r["Metric Name"] == "gpu__time_duration.sum"]
us = lambda r: float(r["Metric Value"].replace(",", "")) * SCALE[r["Metric Unit"]]
name = lambda i: rows[i]["Kernel Name"]
# A forward starts with the token ids' gather (after the deferred tokens' fill, if any); the
# other gather, of the rows to sample, follows the final norm.
starts = []
for i in range(len(rows)):
    if "embedding" in name(i) and not (i > 0 and "rms_norm" in name(i - 1)):
        starts.append(i - 1 if i > 0 and "deferred" in name(i - 1) else i)
forwards = [rows[a:b] for a, b in zip(starts, starts[1:] + [len(rows)])]
def show(title, part):
    total = sum(map(us, part))
    print(f"\n{title}: {len(part)} kernels, {total:.1f} us of kernel time")
    for r in part:
        print(f"  {us(r):8.1f} us  {100 * us(r) / total:5.1f} %  {r['Kernel Name'][:60]}")
if len(forwards) < 2:
    show("all kernels (forwards not found by name)", rows)
else:
    show("first forward (a prompt or its first chunk)", forwards[0])
    # The slowest decode-only step (no prefill attention) is the one with the most rows.
    decode = [f for f in forwards if not any("prefill_attention" in r["Kernel Name"] for r in f)]
    if decode:
        show("slowest decode-only step", max(decode, key=lambda f: sum(map(us, f))))
PY
