#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root: one kernels-bench subset on several
# stripped bench binaries in turn (the base and its variants, same machine, same call), then,
# with REGEX set, Nsight Compute's full set on one matching launch of each (scripts/gpu-ncu.sh).
# Logs, details.txt and sass.csv go into one archive, $OUT/ab.tgz (the device returns few files).
#   BENCH=prefill_attention REGEX=prefill_attention SKIP=54 \
#     bash scripts/gpu-ab.sh .bin/kernels .bin/kernels_variant ...
set -uo pipefail
: "${BENCH:?set BENCH to the kernels-bench subset (KILN_BENCH_ONLY)}"
out="${OUT:-/tmp}"
work=$(mktemp -d)
gbps=$(python3 scripts/copy_bandwidth.py)
echo "torch device-to-device copy: $gbps GB/s (read + write)" | tee "$work/copy.txt"
for bin in "$@"; do
  name=$(basename "$bin")
  KILN_COPY_GBPS="$gbps" KILN_BENCH_ONLY="$BENCH" timeout "${BENCH_TIMEOUT:-200}" "$bin" \
    > "$work/$name.log" 2>&1
  echo "$name: exit $?"
done
if [ -n "${REGEX:-}" ]; then
  for bin in "$@"; do
    name=$(basename "$bin")
    mkdir -p "$work/ncu_$name"
    OUT="$work/ncu_$name" BIN="$bin" timeout "${NCU_TIMEOUT:-150}" \
      bash scripts/gpu-ncu.sh "$BENCH" "$REGEX" "${SKIP:-0}"
    rm -f "$work/ncu_$name/ncu.ncu-rep"
  done
fi
tar czf "$out/ab.tgz" -C "$work" .
