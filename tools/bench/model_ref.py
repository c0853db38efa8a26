"""transformers 5.23 side of `cargo bench -p afnext-model --bench model` (same shapes, random weights, same threads).

Usage: python model_ref.py THREADS
The bench drives this process over stdin/stdout so that its rounds alternate with afnext's in the same minutes
(this VM's speed drifts by up to +-30 % within the hour). One command per line, one JSON object per answer:

    info                    -> {"transformers", "torch", "threads"}
    matmul                  -> {"gflops"}: f32 4096^3, best of 3 (the machine's f32 matmul peak for torch)
    encoder                 -> {"s"}: one forward of the real-size AF-Whisper encoder on one 30 s window (f32, sdpa)
    drop encoder            -> {}: frees it
    prefill f32|bf16 N      -> {"s"}: one prefill of an N-token prompt, logits of the last position only
    decode f32|bf16 N       -> {"s"}: N greedy steps at batch 1 after a 100-token prompt (the steps only)

Models are built on first use (the decoder converted in place for the other dtype); the caller discards a
first, warm-up answer of each timed command, as it does on its own side.
"""
import json
import sys
from pathlib import Path
import time

import torch
from transformers import AudioFlamingo3EncoderConfig, Qwen2Config, Qwen2ForCausalLM
from transformers.models.audioflamingo3.modeling_audioflamingo3 import AudioFlamingo3Encoder

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Reference:
    def __init__(self, threads):
        self.threads = threads
        self.encoder = None
        self.decoder = None
        self.decoder_dtype = None

    def info(self):
        return {"transformers": __import__("transformers").__version__, "torch": torch.__version__,
                "threads": self.threads}

    def matmul(self):
        a = torch.randn(4096, 4096)
        a @ a
        return {"gflops": 2 * 4096**3 / min(timed(lambda: a @ a) for _ in range(3)) / 1e9}

    def encode(self):
        if self.encoder is None:
            cfg = AudioFlamingo3EncoderConfig(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20,
                                              intermediate_size=5120, num_mel_bins=128, max_source_positions=1500)
            cfg._attn_implementation = "sdpa"
            self.encoder = AudioFlamingo3Encoder(cfg).eval()
            self.features = torch.randn(1, 128, 3000)
            self.mask = torch.ones(1, 3000, dtype=torch.int32)
        with torch.no_grad():
            return {"s": timed(lambda: self.encoder(self.features, input_features_mask=self.mask))}

    def model(self, name):
        if self.decoder is None:
            cfg = Qwen2Config(**json.loads((Path(__file__).parent / "configs/qwen2.5-0.5b-text.json").read_text()))
            cfg._attn_implementation = "sdpa"
            self.decoder = Qwen2ForCausalLM(cfg).eval()
            self.decoder_dtype = torch.float32
        if self.decoder_dtype != DTYPES[name]:
            self.decoder = self.decoder.to(DTYPES[name])
            self.decoder_dtype = DTYPES[name]
        return self.decoder

    def prefill(self, name, n):
        model = self.model(name)
        ids = torch.randint(0, 151000, (1, n))
        with torch.no_grad():
            # Logits of the last position only (what a serving prefill computes, and afnext's side does; the
            # full 1000 x 151 672 logits would add ~0.27 TFLOP to this side's time).
            return {"s": timed(lambda: model(ids, use_cache=True, logits_to_keep=1))}

    def decode(self, name, n):
        model = self.model(name)
        prompt = torch.randint(0, 151000, (1, 100))
        with torch.no_grad():
            out = model(prompt, use_cache=True)
            pkv = out.past_key_values
            tok = out.logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            for _ in range(n):
                out = model(tok, past_key_values=pkv, use_cache=True)
                pkv = out.past_key_values
                tok = out.logits[:, -1:].argmax(-1)
            return {"s": time.perf_counter() - t0}

    def run(self, words):
        match words:
            case ["info"]:
                return self.info()
            case ["matmul"]:
                return self.matmul()
            case ["encoder"]:
                return self.encode()
            case ["drop", "encoder"]:
                self.encoder = None
                return {}
            case ["prefill", name, n] if name in DTYPES:
                return self.prefill(name, int(n))
            case ["decode", name, n] if name in DTYPES:
                return self.decode(name, int(n))
        raise ValueError(f"unknown command {' '.join(words)!r}")


def main():
    threads = int(sys.argv[1])
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    ref = Reference(threads)
    for line in sys.stdin:
        if line.strip():
            print(json.dumps(ref.run(line.split())), flush=True)


if __name__ == "__main__":
    main()
