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
python3 - <<'PY' | tee "$out/sdpa.txt"
import torch, torch.nn.functional as F
# Causal GQA prefill attention, as torch runs it (FlashAttention-2 / cuDNN kernels).
for s in [4096, 8192]:
    q = torch.randn(1, 32, s, 128, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(1, 8, s, 128, dtype=torch.bfloat16, device="cuda")
    v = torch.randn(1, 8, s, 128, dtype=torch.bfloat16, device="cuda")
    f = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    for _ in range(3): f()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(20): f()
    e1.record(); torch.cuda.synchronize()
    t = e0.elapsed_time(e1) / 20 / 1e3
    print(f"torch SDPA causal s={s} h=32 kvh=8 d=128: {t * 1e6:.1f} us, {2 * s * s * 128 * 32 / t / 1e12:.0f} TFLOP/s")
PY
KILN_COPY_GBPS="$gbps" KILN_BENCH_JSON="$out/kernels.json" .bin/kernels 2>&1 | tee "$out/kernels.log"
