#!/usr/bin/env bash
# Runs on the GPU machine: compiles every kernel source in a CubeCL debug log (written when
# CUBECL_DEBUG_LOG=file is set) with nvcc and prints ptxas's resource report (registers, spills,
# shared memory) and its static SASS opcode mix for each — what the method's "read what costs no
# device time" asks for.
#   bash scripts/cubecl-ptxas.sh cubecl.log [name-filter]
set -euo pipefail
log="$1"
filter="${2:-}"
dir=$(mktemp -d)
python3 - "$log" "$dir" "$filter" <<'PY'
import re, sys
log, out, filt = sys.argv[1], sys.argv[2], sys.argv[3]
text = open(log).read()
for i, block in enumerate(text.split("[START_KERNEL_COMPILATION]")[1:]):
    name = block.split("\n", 2)[1].strip()
    src = re.search(r"```cpp\n(.*?)```", block, re.S)
    if src and filt in block:
        # NVRTC's uint64 is unsigned long long; nvcc's uint64_t on Linux is unsigned long.
        code = src.group(1).replace("typedef unsigned long long int uint64;", "typedef unsigned long int uint64;")
        open(f"{out}/k{i}.cu", "w").write(code)
        open(f"{out}/k{i}.name", "w").write(name)
PY
for f in "$dir"/*.cu; do
  [ -e "$f" ] || continue
  echo "== $(cat "${f%.cu}.name") $(grep -o 'void __launch_bounds__([0-9]*)[a-z_0-9]*' "$f" | head -1)"
  nvcc -arch=sm_90a -cubin -o "${f%.cu}.cubin" -Xptxas -v "$f" 2>&1 | grep -E "registers|spill|error" || true
  # The static SASS opcode mix (unrolled loop bodies dominate it) and its HMMA count.
  [ -e "${f%.cu}.cubin" ] || continue
  cuobjdump -sass "${f%.cu}.cubin" | python3 -c '
import collections, re, sys
c = collections.Counter()
for line in sys.stdin:
    m = re.match(r"\s+/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
    if m:
        c[m.group(2)] += 1
total, hmma = sum(c.values()), c["HMMA"]
print(f"SASS: {total} instructions, {hmma} HMMA", " ".join(f"{k}:{v}" for k, v in c.most_common(20)))
'
done
