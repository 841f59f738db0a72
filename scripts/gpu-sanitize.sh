#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, with the stripped bench binary in .bin/:
# every kernel's bf16 GPU check (small shapes, $KILN_SANITIZE) under compute-sanitizer's
# memcheck and racecheck. Logs go to $OUT when it is set.
set -uo pipefail
out="${OUT:-/tmp}"
status=0
for tool in memcheck racecheck; do
  KILN_SANITIZE=1 compute-sanitizer --tool "$tool" --error-exitcode 9 .bin/kernels > "$out/sanitize-$tool.log" 2>&1
  rc=$?
  echo "$tool: exit $rc; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/sanitize-$tool.log" | tail -1)"
  [ $rc -eq 0 ] || status=1
done
exit $status
