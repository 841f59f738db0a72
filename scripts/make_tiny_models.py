"""Tiny random Llama / Qwen2 / Qwen3 models and their reference logits, made with HF transformers.

Run on the GPU machine (it has torch + transformers; CPU works the same):
    python3 scripts/make_tiny_models.py tests/fixtures/tiny
Writes one HF folder per model (config.json + safetensors) and logits.json beside the weights:
the f32 logits of every position of PROMPT, computed from the saved weights upcast to f32.
"""
import json, os, sys
import torch
import transformers as tf

PROMPT = [1, 15, 27, 100, 3, 200, 45, 9, 77, 128, 5, 250]
COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              initializer_range=0.2, rms_norm_eps=1e-5)

MODELS = {
    # f32, sharded (model.safetensors.index.json), llama3 rope scaling, untied output.
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, torch.float32, "40KB", dict(
        rope_theta=500000.0, tie_word_embeddings=False,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=32))),
    # bf16, q/k/v bias, tied embeddings.
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, torch.bfloat16, None, dict(
        rope_theta=1000000.0, tie_word_embeddings=True)),
    # f16, q/k RMSNorm, head_dim not hidden/heads.
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, torch.float16, None, dict(
        head_dim=32, rope_theta=1000000.0, tie_word_embeddings=False)),
}

def main(out):
    for name, (cfg_cls, model_cls, dtype, shard, extra) in MODELS.items():
        torch.manual_seed(0)
        cfg = cfg_cls(**COMMON, **extra)
        model = model_cls(cfg).eval()
        with torch.no_grad():  # give the biases and norms non-trivial values too
            for pname, p in model.named_parameters():
                if pname.endswith("bias") or "norm" in pname:
                    p.add_(torch.randn_like(p) * 0.1)
        d = os.path.join(out, name)
        model.to(dtype).save_pretrained(d, **({"max_shard_size": shard} if shard else {}))
        ref = model_cls.from_pretrained(d, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = ref(torch.tensor([PROMPT])).logits[0]
        json.dump({"how": "python3 scripts/make_tiny_models.py tests/fixtures/tiny "
                          f"(transformers {tf.__version__}, torch {torch.__version__})",
                   "prompt": PROMPT, "dtype": str(dtype).removeprefix("torch."),
                   "logits": [[round(float(x), 7) for x in row] for row in logits]},
                  open(os.path.join(d, "logits.json"), "w"))
        print(name, sorted(os.listdir(d)))

if __name__ == "__main__":
    main(sys.argv[1])
