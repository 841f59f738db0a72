#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, with the stripped bench binary in .bin/:
#   bash scripts/gpu-ncu.sh BENCH KERNEL_REGEX [SKIP]
# Nsight Compute's full set of sections (clocks left alone) on one launch of the kernels
# bench's BENCH whose name matches KERNEL_REGEX, after skipping SKIP such launches (default 0).
# Output in $OUT: ncu.ncu-rep, details.txt (every section) and sass.csv (stall samples per
# SASS instruction).
set -uo pipefail
bench="$1"
regex="$2"
skip="${3:-0}"
out="${OUT:-/tmp}"
KILN_BENCH_ONLY="$bench" ncu --clock-control none --set full --import-source no \
    --kernel-name "regex:$regex" --launch-skip "$skip" --launch-count 1 --kill on \
    --export "$out/ncu" --force-overwrite "${BIN:-.bin/kernels}" > "$out/ncu-run.log" 2>&1
echo "ncu: exit $? ($(tail -1 "$out/ncu-run.log"))"
ncu --import "$out/ncu.ncu-rep" --page details > "$out/details.txt" 2>&1
ncu --import "$out/ncu.ncu-rep" --page source --print-source sass --csv > "$out/sass.csv" 2>&1
