"""Times torch's causal GQA prefill attention (SDPA) at the shapes the kernels bench runs, for
the side-by-side ratio: `python3 scripts/torch_sdpa.py` on the GPU machine."""
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
