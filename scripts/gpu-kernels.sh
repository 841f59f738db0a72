#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, with the stripped bench binary in .bin/:
#   bash scripts/gpu-kernels.sh
# Measures the device's copy bandwidth with torch (the floor's rate), then runs the kernel
# checks and micro-benchmarks; JSON and the log go to $OUT when it is set.
set -euo pipefail
out="${OUT:-/tmp}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
gbps=$(python3 - <<'PY'
import torch
n = 1 << 28
a = torch.empty(n, dtype=torch.bfloat16, device="cuda").uniform_()
b = torch.empty_like(a)
for _ in range(3): b.copy_(a)
torch.cuda.synchronize()
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
t = []
for _ in range(20):
    s.record(); b.copy_(a); e.record(); torch.cuda.synchronize(); t.append(s.elapsed_time(e))
t.sort()
print(f"{2 * n * 2 / (t[len(t)//2] / 1e3) / 1e9:.0f}")
PY
)
echo "torch device-to-device copy: $gbps GB/s (read + write)"
python3 - <<'PY' | tee "$out/cublas.txt"
import torch
for m, n, k in [(512, 14336, 4096), (4096, 14336, 4096), (2048, 4096, 14336)]:
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
    for _ in range(3): x @ w.T
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(10): x @ w.T
    e.record(); torch.cuda.synchronize()
    t = s.elapsed_time(e) / 10 / 1e3
    print(f"torch (cuBLAS) m={m} n={n} k={k}: {t * 1e6:.1f} us, {2 * m * n * k / t / 1e12:.0f} TFLOP/s")
PY
KILN_COPY_GBPS="$gbps" KILN_BENCH_JSON="$out/kernels.json" .bin/kernels 2>&1 | tee "$out/kernels.log"
