"""Reference dequantization for every GGUF tensor type kiln reads, from gguf-py.

    pip install gguf==0.19.0 numpy && python3 scripts/make_dequant_fixture.py > tests/fixtures/dequant.json

Each case: two blocks of random bytes whose f16 scale fields are set to finite random values, and the
f32 values gguf-py's reference dequantizer gives for them.
"""
import json
import numpy as np
from gguf import GGMLQuantizationType as T, GGML_QUANT_SIZES, quants

rng = np.random.default_rng(7)

# Byte offsets of the f16 scale fields inside one block, per type.
F16_FIELDS = {T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q8_0: [0], T.Q4_K: [0, 2], T.Q6_K: [208]}

def case(t):
    block, size = GGML_QUANT_SIZES[t]
    n_blocks = 2 if block > 1 else 16
    if t == T.F32:
        raw = rng.standard_normal(block * n_blocks).astype(np.float32).tobytes()
    elif t == T.F16:
        raw = rng.standard_normal(block * n_blocks).astype(np.float16).tobytes()
    elif t == T.BF16:
        f = rng.standard_normal(block * n_blocks).astype(np.float32)
        raw = (f.view(np.uint32) >> 16).astype(np.uint16).tobytes()
    else:
        buf = bytearray(rng.integers(0, 256, size * n_blocks, dtype=np.uint8).tobytes())
        for b in range(n_blocks):
            for off in F16_FIELDS[t]:
                v = np.float16(rng.uniform(-0.05, 0.05))
                buf[b * size + off: b * size + off + 2] = v.tobytes()
        raw = bytes(buf)
    values = quants.dequantize(np.frombuffer(raw, dtype=np.uint8), t).astype(np.float32).reshape(-1)
    return {"type": t.name, "bytes": raw.hex(), "values": [float(v) for v in values]}

types = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q4_K, T.Q6_K]
print(json.dumps({"how": "pip install gguf==0.19.0 numpy && python3 scripts/make_dequant_fixture.py > tests/fixtures/dequant.json",
                  "cases": [case(t) for t in types]}))
