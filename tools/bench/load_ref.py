"""transformers 5.23 side of `cargo bench -p afnext-server --bench load`: a static batch (what serving with
transformers amounts to) on the same Qwen2.5-0.5B-shaped random decoder, same threads, same dtype.

Usage: python load_ref.py THREADS DTYPE
The bench drives this process over stdin/stdout so that its batches alternate with the server's rounds in the
same minutes (this VM's speed drifts within the hour). First line out: {"transformers", "torch", "dtype"},
once the model is built and warmed up. Then one command per line, `BATCH PROMPT_TOKENS NEW_TOKENS`, answered
with one JSON object: the wall time of `generate` on a static batch of random prompts (prefill included, as a
client sees it) and the generated tokens per second over the whole batch.
"""
import json
import sys
from pathlib import Path
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM


def main():
    threads, dtype = int(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = Qwen2Config(**json.loads((Path(__file__).parent / "configs/qwen2.5-0.5b-text.json").read_text()))
    cfg._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(cfg).eval().to({"f32": torch.float32, "bf16": torch.bfloat16}[dtype])

    def run(batch, n_prompt, n_new):
        ids = torch.randint(0, 151000, (batch, n_prompt))
        with torch.no_grad():
            t0 = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, min_new_tokens=n_new,
                           do_sample=False, pad_token_id=0)
            return time.perf_counter() - t0

    run(2, 8, 2)
    print(json.dumps({"transformers": __import__("transformers").__version__, "torch": torch.__version__,
                      "dtype": dtype}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        batch, n_prompt, n_new = (int(x) for x in line.split())
        t = run(batch, n_prompt, n_new)
        print(json.dumps({"seconds": t, "tok_s": batch * n_new / t}), flush=True)


if __name__ == "__main__":
    main()
