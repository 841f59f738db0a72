"""End-to-end check of kiln's CUDA engine against HF transformers, on random weights of real
model shapes (the GPU machine has no hub access). Run there from the repository root, with the
stripped bench binary at .bin/engine:

    python3 scripts/gpu_e2e.py llama-3.1-8b [qwen2.5-7b qwen3-0.6b] [--bench] [--no-check]
        [--f32] [--layers N] [--concurrency 1,16,64] [--long 8192,16384,32768]

For each shape: builds the model in bf16 with seeded random weights, saves it as safetensors
(with a stand-in word-level tokenizer.json), has transformers generate 33 greedy tokens for 4
prompts, has kiln compute the logits of the same prefill + 32 decode steps (teacher-forced),
one prompt at a time and then all four in each step's batch ("together": multi-row decode),
and reports the relative error of kiln's logits and where its greedy choice first differs.
--f32 runs kiln's engine in f32 instead, against the f32 model: random weights give near-flat
logits whose greedy picks no bf16 engine (transformers' own included) follows for long, while
f32 keeps them, so this is where the greedy criterion (same picks as transformers) is decided.
--bench then serves requests through kiln's Engine (benches/engine.rs bench). --layers keeps
only the first N decoder layers (for profiling); --long adds one request per long prompt length.
The GPU's memory in use is sampled during the benchmark (nvidia-smi, whole device). Results: $OUT.
"""
import json, os, subprocess, sys, time
import numpy as np
import torch
import transformers as tf
from tokenizers import Tokenizer, models, pre_tokenizers

SHAPES = {
    "llama-3.1-8b": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=8192))),
    "qwen2.5-7b": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)),
    "qwen3-0.6b": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True)),
}
PROMPT_LENS = [17, 33, 64, 100]
STEPS = 33  # the prefill's logits + 32 decode steps
OUT = os.environ.get("OUT", "/tmp")

def option(flag, default):
    return sys.argv[sys.argv.index(flag) + 1] if flag in sys.argv else default

def build(name):
    cfg_cls, model_cls, kw = SHAPES[name]
    kw = dict(kw, num_hidden_layers=int(option("--layers", kw["num_hidden_layers"])))
    d = f"/tmp/kiln-{name}-{kw['num_hidden_layers']}"
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = model_cls(cfg_cls(**kw)).eval()
    torch.set_default_dtype(torch.float32)
    with torch.no_grad():  # give biases and norms non-trivial values too
        for pname, p in model.named_parameters():
            if pname.endswith("bias") or "norm" in pname:
                p.add_(torch.randn_like(p) * 0.1)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    t = time.time()
    model.save_pretrained(d, max_shard_size="5GB")
    vocab = {f"t{i}": i for i in range(kw["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(os.path.join(d, "tokenizer.json"))
    print(f"{name}: saved in {time.time() - t:.0f}s", flush=True)
    return model, d, kw["vocab_size"]

def check(name):
    model, d, vocab = build(name)
    rng = np.random.default_rng(1)
    cases, ref_logits = [], []
    for n in PROMPT_LENS:
        ids = rng.integers(0, vocab, n).tolist()
        with torch.no_grad():
            g = model.generate(torch.tensor([ids], device="cuda"), max_new_tokens=STEPS, do_sample=False,
                               output_logits=True, return_dict_in_generate=True)
        toks = g.sequences[0, n:].tolist()
        cases.append({"prompt_ids": ids, "reference_tokens": toks})
        ref_logits.append(torch.cat(g.logits).float().cpu().numpy())
    # The same model in f32 (weights upcast from bf16), teacher-forced on the same tokens: the
    # ground truth that both bf16 implementations are measured against.
    model.float()
    f32_logits = []
    for case in cases:
        n = len(case["prompt_ids"])
        seq = torch.tensor([case["prompt_ids"] + case["reference_tokens"][:-1]], device="cuda")
        with torch.no_grad():
            f32_logits.append(model(seq).logits[0, n - 1:].float().cpu().numpy())
    del model
    torch.cuda.empty_cache()
    cases_path = f"/tmp/{name}-cases.json"
    json.dump({"cases": cases}, open(cases_path, "w"))
    report = {"shape": name}
    rel = lambda a, b: np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)
    # One case at a time (one-row decode steps), then all four in each step's batch (4-row
    # decode: the skinny GEMM and the multi-query decode attention).
    modes = (("cases", []), ("together", ["--together"]))
    if "--f32" in sys.argv:
        modes = tuple((f"{mode}-f32", flags + ["--dtype", "f32"]) for mode, flags in modes)
    for mode, flags in modes:
        out_path = f"/tmp/{name}-kiln-{mode}.f32"
        subprocess.run([".bin/engine", "check", "--model", d, "--cases", cases_path, "--out", out_path]
                       + flags, check=True)
        kiln = np.fromfile(out_path, dtype=np.float32).reshape(len(cases), STEPS, vocab)
        for c, (case, ref, f32) in enumerate(zip(cases, ref_logits, f32_logits)):
            err, hf_err, kiln_err = rel(kiln[c], ref), rel(ref, f32), rel(kiln[c], f32)
            agree = next((i for i in range(STEPS) if int(kiln[c, i].argmax()) != case["reference_tokens"][i]), STEPS)
            f32_agree = next((i for i in range(STEPS) if int(kiln[c, i].argmax()) != int(f32[i].argmax())), STEPS)
            hf_f32_agree = next((i for i in range(STEPS) if int(ref[i].argmax()) != int(f32[i].argmax())), STEPS)
            report.setdefault(mode, []).append({"prompt_len": len(case["prompt_ids"]),
                                 "kiln_vs_hf_bf16": {"max": float(err.max()), "mean": float(err.mean())},
                                 "kiln_vs_f32": {"max": float(kiln_err.max()), "mean": float(kiln_err.mean())},
                                 "hf_bf16_vs_f32": {"max": float(hf_err.max()), "mean": float(hf_err.mean())},
                                 "greedy_agree_with_hf_bf16": agree, "greedy_agree_with_f32": f32_agree,
                                 "hf_bf16_greedy_agree_with_f32": hf_f32_agree})
            print(f"{name} {mode} prompt {len(case['prompt_ids'])}: rel err vs HF bf16 max {err.max():.2e} "
                  f"mean {err.mean():.2e}; vs f32: kiln mean {kiln_err.mean():.2e}, HF bf16 mean "
                  f"{hf_err.mean():.2e}; greedy agrees {agree}/{STEPS} with HF bf16, {f32_agree}/{STEPS} "
                  f"with f32 (HF bf16: {hf_f32_agree}/{STEPS})", flush=True)
    json.dump(report, open(os.path.join(OUT, f"e2e-{name}.json"), "w"), indent=1)
    return d

if __name__ == "__main__":
    names = [a for a in sys.argv[1:] if a in SHAPES]
    for name in names:
        if "--no-check" in sys.argv:  # only save the model, for --bench
            model, d, _ = build(name)
            del model
            torch.cuda.empty_cache()
        else:
            d = check(name)
        if "--bench" in sys.argv:
            env = dict(os.environ, KILN_BENCH_JSON=os.path.join(OUT, f"bench-{name}.json"))
            cmd = [".bin/engine", "bench", "--model", d, "--concurrency", option("--concurrency", "1,16,64"),
                   "--prompt-len", "512", "--gen", "128"]
            if "--long" in sys.argv:
                cmd += ["--long", option("--long", "")]
            smi = subprocess.Popen(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                    "-lms", "200"], stdout=subprocess.PIPE, text=True)
            try:
                subprocess.run(cmd, check=True, env=env)
            finally:
                smi.terminate()
            used = [int(l) for l in smi.communicate()[0].split() if l.strip().isdigit()]
            print(f"{name}: peak GPU memory in use during the benchmark: {max(used, default=0)} MiB", flush=True)
