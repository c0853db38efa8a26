"""transformers side of the GPU benchmark (scripts/gpu-check.sh); afnext's side is crates/model/benches/device.rs.

Usage: python gpu_ref.py CONFIG_DIR [--device cuda] [--quick]

Builds MusicFlamingoForConditionalGeneration from CONFIG_DIR/config.json alone (weights in the folder are
ignored) with random bf16 weights, sdpa attention, and measures on one device:
  copy_gb_s            device-to-device copy of a 2 GiB tensor, bytes read + written per second
  matmul_bf16_tflops   8192^3 bf16 matmul
  encoder_windows_s    full 30 s windows per second through get_audio_features (encoder + RoTE + projector)
  prefill_tok_s        one prompt of 1 000 / 10 000 / 45 000 random ids, last row's logits only
  decode_tok_s         1 / 8 / 32 sequences with 1 000 tokens of context, 32 greedy steps
  decoder_weight_bytes what a batch-1 decode step reads (decoder layers + lm_head, not the embedding table)
--quick uses tiny sizes (a CPU smoke test with tests/fixtures/ckpt/tiny-a).
Progress goes to stderr; one JSON object goes to stdout, on the last line, also when killed by SIGTERM
(`timeout`), with what was measured so far.
"""
import argparse
import json
import os
import signal
import statistics
import sys
import time

import torch

T_START = time.perf_counter()
RES = {}


def log(msg):
    print(f"[{time.perf_counter() - T_START:6.1f} s] {msg}", file=sys.stderr, flush=True)


def emit():
    RES["wall_s"] = round(time.perf_counter() - T_START, 1)
    print(json.dumps(RES), flush=True)


def on_sigterm(*_):
    # `timeout` would otherwise leave the table with nothing; report what is done.
    RES["incomplete"] = "killed by SIGTERM"
    emit()
    os._exit(124)


class Bench:
    def __init__(self, dev):
        self.dev = dev

    def sync(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)

    def median_s(self, fn, reps, warmup=1):
        """Median wall seconds of `reps` runs after `warmup` untimed ones (kernel selection, allocator growth)."""
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def free(self):
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()


def section(name, fn):
    """Runs one measurement; a failure (say, out of memory) is recorded and the others still run."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - any failure is a result to report, not a reason to stop
        log(f"{name} FAILED: {e!r}")
        RES.setdefault("errors", {})[name] = repr(e)[:400]


def copy_bandwidth(b, nbytes, inner):
    src = torch.empty(nbytes, dtype=torch.uint8, device=b.dev).random_(0, 256)
    dst = torch.empty_like(src)

    def run():
        for _ in range(inner):
            dst.copy_(src)

    s = b.median_s(run, reps=5)
    RES["copy_gb_s"] = 2 * nbytes * inner / s / 1e9
    log(f"copy {nbytes / 2**30:.2f} GiB: {RES['copy_gb_s']:,.0f} GB/s (read + write)")
    del src, dst
    b.free()


def matmul_tflops(b, n, inner):
    x = torch.randn(n, n, dtype=torch.bfloat16, device=b.dev)
    y = torch.randn(n, n, dtype=torch.bfloat16, device=b.dev)
    out = torch.empty(n, n, dtype=torch.bfloat16, device=b.dev)

    def run():
        for _ in range(inner):
            torch.matmul(x, y, out=out)

    s = b.median_s(run, reps=5)
    RES["matmul_bf16_tflops"] = 2 * n**3 * inner / s / 1e12
    log(f"matmul bf16 {n}^3: {RES['matmul_bf16_tflops']:,.1f} TFLOP/s")
    del x, y, out
    b.free()


def build_model(config_dir, dev):
    from transformers import MusicFlamingoConfig, MusicFlamingoForConditionalGeneration

    cfg = MusicFlamingoConfig.from_pretrained(config_dir)
    # Parameters are created and randomly initialised on the device itself: 8 B parameters must never
    # pass through host memory (and the host init alone would take minutes).
    with torch.device(dev):
        model = MusicFlamingoForConditionalGeneration._from_config(
            cfg, dtype=torch.bfloat16, attn_implementation="sdpa"
        )
    return cfg, model.eval()


def weight_bytes(model):
    # What batch-1 decode streams per step: every decoder layer and the lm_head. The embedding table is read
    # one row per token, so it is left out (afnext's device bench counts the same way; it also skips the
    # biases and norm weights, a 0.01% difference).
    emb = model.get_input_embeddings().weight
    lm = model.model.language_model
    n = sum(p.numel() * p.element_size() for p in lm.parameters() if p is not emb)
    return n + sum(p.numel() * p.element_size() for p in model.lm_head.parameters())


def encoder(b, cfg, model, windows, reps):
    a = cfg.audio_config
    frames, rows = 2 * a.max_source_positions, a.max_source_positions // 2
    res = RES.setdefault("encoder_windows_s", {})
    for w in windows:
        x = torch.randn(w, a.num_mel_bins, frames, dtype=torch.bfloat16, device=b.dev)
        mask = torch.ones(w, frames, dtype=torch.long, device=b.dev)
        # One audio of w full windows: RoTE numbers its windows 0..w-1 from the run of <sound> ids, as in a
        # real prompt (the ids only steer the timestamps; the decoder is not run here).
        ids = torch.full((1, w * rows), cfg.audio_token_id, dtype=torch.long, device=b.dev)
        s = b.median_s(lambda: model.get_audio_features(x, mask, ids), reps)
        res[str(w)] = w / s
        log(f"encoder {w} windows: {s:.4f} s = {w / s:,.1f} windows/s")
        del x, mask, ids
    b.free()


def prefill(b, cfg, model, prompts, reps):
    vocab = cfg.text_config.vocab_size
    res = RES.setdefault("prefill_tok_s", {})
    for n in prompts:
        ids = torch.randint(0, vocab, (1, n), device=b.dev)
        # logits_to_keep=1: only the last row goes through the lm_head, as generation does.
        s = b.median_s(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1),
                       reps if n <= 20_000 else 1)
        res[str(n)] = n / s
        log(f"prefill {n}: {s:.3f} s = {n / s:,.0f} tokens/s")
        del ids
        b.free()


def decode(b, cfg, model, batches, ctx, steps, warm):
    vocab = cfg.text_config.vocab_size
    res = RES.setdefault("decode_tok_s", {})
    for bs in batches:
        ids = torch.randint(0, vocab, (bs, ctx), device=b.dev)
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)  # contexts: not timed
        cache = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        del out
        for step in range(warm + steps):
            if step == warm:  # the first steps pick kernels for the new shapes, as in afnext's bench
                b.sync()
                t0 = time.perf_counter()
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            # The ids come back to the host every step, as a server (and generate's stop check) needs them.
            nxt.cpu()
        b.sync()
        s = time.perf_counter() - t0
        res[str(bs)] = bs * steps / s
        log(f"decode batch {bs}: {s / steps * 1e3:.2f} ms/step = {bs * steps / s:,.1f} tokens/s")
        del ids, cache, out, nxt
        b.free()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config_dir")
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a CPU smoke test")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, on_sigterm)

    dev = torch.device(args.device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    b = Bench(dev)
    torch.manual_seed(0)
    RES.update(torch=torch.__version__, device=str(dev), dtype="bf16", attn="sdpa", quick=args.quick,
               device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu")
    try:
        import transformers
        RES["transformers"] = transformers.__version__
    except ImportError as e:
        RES["errors"] = {"import": repr(e)}
        emit()
        return 1

    if args.quick:
        sizes = dict(copy=(64 << 20, 2), mm=(512, 2), windows=[1, 2, 4], prompts=[16, 32, 64],
                     batches=[1, 2, 4], ctx=16, steps=4, warm=1, reps=2)
    else:
        sizes = dict(copy=(2 << 30, 10), mm=(8192, 10), windows=[1, 8, 32], prompts=[1000, 10_000, 45_000],
                     batches=[1, 8, 32], ctx=1000, steps=32, warm=4, reps=3)
    log(f"torch {torch.__version__}, transformers {RES['transformers']}, {RES['device_name']}")

    # The raw card first, before the model takes its memory.
    section("copy", lambda: copy_bandwidth(b, *sizes["copy"]))
    section("matmul", lambda: matmul_tflops(b, *sizes["mm"]))

    try:
        cfg, model = build_model(args.config_dir, dev)
        b.sync()
    except Exception as e:  # noqa: BLE001
        log(f"model FAILED: {e!r}")
        RES.setdefault("errors", {})["model"] = repr(e)[:400]
        emit()
        return 1
    RES["decoder_weight_bytes"] = weight_bytes(model)
    RES["params"] = sum(p.numel() for p in model.parameters())
    log(f"random model on {dev}: {RES['params'] / 1e9:.3f} B parameters")

    with torch.inference_mode():
        section("encoder", lambda: encoder(b, cfg, model, sizes["windows"], sizes["reps"]))
        section("prefill", lambda: prefill(b, cfg, model, sizes["prompts"], sizes["reps"]))
        section("decode", lambda: decode(b, cfg, model, sizes["batches"], sizes["ctx"], sizes["steps"],
                                         sizes["warm"]))
    if dev.type == "cuda":
        RES["peak_mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    emit()
    return 1 if "errors" in RES else 0


if __name__ == "__main__":
    sys.exit(main())
