"""Prints the GPU's device-to-device copy bandwidth in GB/s (bytes read + written; median of 20
copies of 512 MiB through torch): the rate the memory floors in benches/RESULTS.md use."""
import torch

n = 1 << 28
a = torch.empty(n, dtype=torch.bfloat16, device="cuda").uniform_()
b = torch.empty_like(a)
for _ in range(3):
    b.copy_(a)
torch.cuda.synchronize()
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
t = []
for _ in range(20):
    s.record()
    b.copy_(a)
    e.record()
    torch.cuda.synchronize()
    t.append(s.elapsed_time(e))
t.sort()
print(f"{2 * n * 2 / (t[len(t) // 2] / 1e3) / 1e9:.0f}")
