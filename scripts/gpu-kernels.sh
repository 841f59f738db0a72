#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, with the stripped bench binary in .bin/:
#   bash scripts/gpu-kernels.sh
# Measures the device's copy bandwidth with torch (the floor's rate), then runs the kernel
# checks and micro-benchmarks; JSON and the log go to $OUT when it is set.
set -euo pipefail
out="${OUT:-/tmp}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
gbps=$(python3 scripts/copy_bandwidth.py)
echo "torch device-to-device copy: $gbps GB/s (read + write)"
python3 - <<'PY' | tee "$out/cublas.txt"
import torch
for m, n, k in [(512, 14336, 4096), (4096, 14336, 4096), (2048, 4096, 14336), (2048, 28672, 4096), (2048, 6144, 4096), (2048, 4096, 4096)]:
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
python3 scripts/torch_sdpa.py | tee "$out/sdpa.txt"
KILN_COPY_GBPS="$gbps" KILN_BENCH_JSON="$out/kernels.json" .bin/kernels 2>&1 | tee "$out/kernels.log"
