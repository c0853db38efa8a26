"""transformers 5.23 side of `cargo bench -p afnext-model --bench model` (same shapes, random weights, same threads).

Usage: python model_ref.py THREADS ENCODER_ITERS PREFILL_TOKENS DECODE_TOKENS
Prints one JSON object with seconds per encoder window (f32, sdpa), prefill tokens/s and decode tokens/s at
batch 1 (f32 and bf16) for a Qwen2.5-0.5B-shaped decoder, and the machine's f32 matmul throughput (4096^3).
"""
import json
import sys
from pathlib import Path
import time

import torch
from transformers import AudioFlamingo3EncoderConfig, Qwen2Config, Qwen2ForCausalLM
from transformers.models.audioflamingo3.modeling_audioflamingo3 import AudioFlamingo3Encoder


def best(fn, iters):
    fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def main():
    threads, enc_iters, n_prefill, n_decode = (int(x) for x in sys.argv[1:5])
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    res = {"transformers": __import__("transformers").__version__, "torch": torch.__version__, "threads": threads}

    a = torch.randn(4096, 4096)
    t = best(lambda: a @ a, 3)
    res["matmul_f32_gflops"] = 2 * 4096**3 / t / 1e9

    if enc_iters == 0:
        enc_iters = None
    enc_cfg = None if enc_iters is None else AudioFlamingo3EncoderConfig(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20,
                                          intermediate_size=5120, num_mel_bins=128, max_source_positions=1500)
    if enc_cfg is not None:
        enc_cfg._attn_implementation = "sdpa"
        enc = AudioFlamingo3Encoder(enc_cfg).eval()
        x = torch.randn(1, 128, 3000)
        mask = torch.ones(1, 3000, dtype=torch.int32)
        with torch.no_grad():
            res["encoder_f32_s_per_window"] = best(lambda: enc(x, input_features_mask=mask), enc_iters)
        del enc

    dec_cfg = Qwen2Config(**json.loads((Path(__file__).parent / "configs/qwen2.5-0.5b-text.json").read_text()))
    dec_cfg._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(dec_cfg).eval()
    for name, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
        model = model.to(dtype)
        ids = torch.randint(0, 151000, (1, n_prefill))
        with torch.no_grad():
            # Best of 3 (as the afnext side), logits of the last position only (what a serving prefill
            # computes; the full 1000 x 151 672 logits would add ~0.27 TFLOP to this side's time).
            t = best(lambda: model(ids, use_cache=True, logits_to_keep=1), 3)
            res[f"prefill_{name}_tok_s"] = n_prefill / t
            prompt = torch.randint(0, 151000, (1, 100))

            def decode():
                out = model(prompt, use_cache=True)
                pkv = out.past_key_values
                tok = out.logits[:, -1:].argmax(-1)
                t0 = time.perf_counter()
                for _ in range(n_decode):
                    out = model(tok, past_key_values=pkv, use_cache=True)
                    pkv = out.past_key_values
                    tok = out.logits[:, -1:].argmax(-1)
                return time.perf_counter() - t0

            decode()
            res[f"decode_{name}_tok_s"] = n_decode / min(decode() for _ in range(2))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
