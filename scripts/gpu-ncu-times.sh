#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root: the kernels bench's BENCH subset under
# Nsight Compute for each binary given, ITERS launches a timed run (default 4: the bench's four
# weight copies, so no launch finds its weight in L2), recording every kernel's device duration
# and DRAM bytes — free of the host launch overhead that host timing adds to short kernels.
# Caches are left warm (as in serving: a split GEMM's reduction finds its partial sums in L2).
# One CSV per binary into $OUT/times.tgz; per-case medians: `python3 scripts/ncu-runs.py X.csv
# --every mma_gemm 24` (skinny, sweep_splits: 24 launches a case at ITERS=4).
#   BENCH=skinny bash scripts/gpu-ncu-times.sh .bin/kernels .bin/kernels_variant
set -uo pipefail
: "${BENCH:?set BENCH to the kernels-bench subset (KILN_BENCH_ONLY)}"
out="${OUT:-/tmp}"
work=$(mktemp -d)
for bin in "$@"; do
  name=$(basename "$bin")
  KILN_BENCH_ITERS="${ITERS:-4}" KILN_BENCH_ONLY="$BENCH" timeout "${NCU_TIMEOUT:-200}" \
    ncu --clock-control none --cache-control none \
    --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \
    --csv --log-file "$work/$name.csv" "$bin" > "$work/$name.log" 2>&1
  echo "$name: exit $? ($(grep -c gpu__time_duration "$work/$name.csv") kernels)"
done
tar czf "$out/times.tgz" -C "$work" .
