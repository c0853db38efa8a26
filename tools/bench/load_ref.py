"""transformers 5.23 side of `cargo bench -p afnext-server --bench load`: a static batch (what serving with
transformers amounts to) on the same Qwen2.5-0.5B-shaped random decoder, same threads, same dtype.

Usage: python load_ref.py THREADS DTYPE BATCH PROMPT_TOKENS NEW_TOKENS
Prints one JSON object: generated tokens per second over the whole batch (prefill included, as a client
sees it), and the wall time.
"""
import json
import sys
from pathlib import Path
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM


def main():
    threads, dtype, batch, n_prompt, n_new = sys.argv[1], sys.argv[2], *(int(x) for x in sys.argv[3:6])
    torch.set_num_threads(int(threads))
    torch.manual_seed(0)
    cfg = Qwen2Config(**json.loads((Path(__file__).parent / "configs/qwen2.5-0.5b-text.json").read_text()))
    cfg._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(cfg).eval().to({"f32": torch.float32, "bf16": torch.bfloat16}[dtype])
    ids = torch.randint(0, 151000, (batch, n_prompt))
    mask = torch.ones_like(ids)

    def run(n):
        with torch.no_grad():
            t0 = time.perf_counter()
            model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0)
            return time.perf_counter() - t0

    run(2)
    t = run(n_new)
    print(json.dumps({"transformers": __import__("transformers").__version__, "torch": torch.__version__,
                      "dtype": dtype, "batch": batch, "new_tokens": n_new, "seconds": t,
                      "tok_s": batch * n_new / t}))


if __name__ == "__main__":
    main()
