"""Reference greedy continuations for the GGUF test models: an independent plain-numpy forward
(float64) over gguf-py's dequantized weights, in GGUF's own layout (llama: interleaved RoPE on the
permuted Q/K rows, as llama.cpp computes it; qwen2: rotate-half RoPE).

    pip install gguf==0.19.0 numpy tokenizers
    python3 scripts/reference_greedy.py MODELS_DIR > tests/fixtures/greedy-reference.json

MODELS_DIR is the cache scripts/fetch-models.sh fills. Prompt ids come from a byte-level BPE built
with the Python `tokenizers` package from the GGUF's vocabulary (the Rust tokenizer is checked
against llama.cpp's ids separately).
"""
import json, os, sys
import numpy as np
from gguf import GGUFReader, quants
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, Regex

CASES = {
    "smollm2": ("SmolLM2-135M-Instruct.Q4_1.gguf", 16,
                ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a"]),
    "qwen2": ("qwen2.5-coder-0.5b-instruct.gguf", 8,
              ["def quicksort(arr):", "The capital of France is"]),
}
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
QWEN2 = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

def field(r, key):
    return r.fields[key].contents()

def tokenizer(r):
    toks = field(r, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in field(r, "tokenizer.ggml.merges")]
    tk = Tokenizer(models.BPE({t: i for i, t in enumerate(toks)}, merges))
    pre = field(r, "tokenizer.ggml.pre")
    pats = {"smollm": [r"\p{N}", GPT2], "qwen2": [QWEN2]}[pre]
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(p), "isolated") for p in pats]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    return tk

def weights(r):
    out = {}
    for t in r.tensors:
        w = quants.dequantize(t.data, t.tensor_type).astype(np.float64)
        out[t.name] = w.reshape([int(d) for d in reversed(t.shape)]) if w.ndim == 1 and len(t.shape) > 1 else w
    return out

def rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

def rope(x, pos, theta, interleaved):
    # x: [T, H, D]
    d = x.shape[-1]
    inv = theta ** (-np.arange(0, d, 2) / d)
    ang = pos[:, None] * inv[None, :]            # [T, D/2]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * cos - b * sin
        out[..., 1::2] = a * sin + b * cos
        return out
    a, b = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)

def forward(W, cfg, ids):
    arch, L, H, KV, eps, theta = cfg
    x = W["token_embd.weight"][ids]
    T, hid = x.shape
    hd = hid // H
    pos = np.arange(T, dtype=np.float64)
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for l in range(L):
        p = f"blk.{l}."
        h = rms(x, W[p + "attn_norm.weight"], eps)
        def proj(n):
            y = h @ W[p + n + ".weight"].T
            return y + W[p + n + ".bias"] if p + n + ".bias" in W else y
        q = proj("attn_q").reshape(T, H, hd)
        k = proj("attn_k").reshape(T, KV, hd)
        v = proj("attn_v").reshape(T, KV, hd)
        q, k = rope(q, pos, theta, arch == "llama"), rope(k, pos, theta, arch == "llama")
        k, v = np.repeat(k, H // KV, 1), np.repeat(v, H // KV, 1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        a = np.einsum("hts,shd->thd", s, v).reshape(T, H * hd)
        x = x + a @ W[p + "attn_output.weight"].T
        h = rms(x, W[p + "ffn_norm.weight"], eps)
        g = h @ W[p + "ffn_gate.weight"].T
        u = h @ W[p + "ffn_up.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ W[p + "ffn_down.weight"].T
    x = rms(x[-1], W["output_norm.weight"], eps)
    return x @ W.get("output.weight", W["token_embd.weight"]).T

def main(models_dir):
    out = {"how": "python3 scripts/reference_greedy.py MODELS_DIR > tests/fixtures/greedy-reference.json "
                  "(plain numpy float64 forward over gguf-py 0.19.0 dequantized weights)", "models": {}}
    for key, (fname, n_new, prompts) in CASES.items():
        r = GGUFReader(os.path.join(models_dir, fname))
        arch = field(r, "general.architecture")
        cfg = (arch, field(r, f"{arch}.block_count"), field(r, f"{arch}.attention.head_count"),
               field(r, f"{arch}.attention.head_count_kv"),
               field(r, f"{arch}.attention.layer_norm_rms_epsilon"), field(r, f"{arch}.rope.freq_base"))
        W, tk = weights(r), tokenizer(r)
        cases = []
        for prompt in prompts:
            ids = tk.encode(prompt).ids
            seq, margins = list(ids), []
            for _ in range(n_new):
                logits = forward(W, cfg, np.array(seq))
                top2 = np.sort(logits)[-2:]
                margins.append(round(float(top2[1] - top2[0]), 4))
                seq.append(int(np.argmax(logits)))
            new = seq[len(ids):]
            cases.append({"prompt": prompt, "prompt_ids": ids, "greedy_ids": new,
                          "greedy_text": tk.decode(new), "top2_margins": margins})
            print(key, prompt, repr(tk.decode(new)), file=sys.stderr)
        out["models"][key] = {"file": fname, "cases": cases}
    print(json.dumps(out, indent=1))

if __name__ == "__main__":
    main(sys.argv[1])
