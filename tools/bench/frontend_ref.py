"""Times transformers' WhisperFeatureExtractor (the AF-Next front end) on one 30 s window.

Called by `cargo bench -p afnext-audio --bench frontend`, which times afnext on the same window in the same run.
Usage: python frontend_ref.py AUDIO_FILE ITERATIONS OUT_NPY
Prints one JSON object: milliseconds per window (median) for the public call and for the numpy and torch
code paths at 1 and 2 torch threads, and writes the public call's features to OUT_NPY for a correctness check.
"""
import json
import sys
import time

import numpy as np
import soundfile as sf
import torch
from transformers import WhisperFeatureExtractor


def median_ms(fn, iters):
    fn()  # warm-up
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(ts))


def main():
    path, iters, out_npy = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    wav, sr = sf.read(path, dtype="float32")
    assert sr == 16000 and wav.ndim == 1, (sr, wav.shape)
    chunk = wav[:480000]
    fe = WhisperFeatureExtractor(feature_size=128)
    res = {"transformers": __import__("transformers").__version__, "torch": torch.__version__,
           "numpy": np.__version__}
    batch = chunk[None, :]
    for threads in (1, 2):
        torch.set_num_threads(threads)
        res[f"call_{threads}t"] = median_ms(
            lambda: fe(chunk, sampling_rate=16000, return_tensors="np", padding="max_length"), iters)
        res[f"torch_{threads}t"] = median_ms(lambda: fe._torch_extract_fbank_features(batch, "cpu"), iters)
        res[f"numpy_{threads}t"] = median_ms(lambda: fe._np_extract_fbank_features(batch, "cpu"), iters)
    feats = fe(chunk, sampling_rate=16000, return_tensors="np", padding="max_length")["input_features"][0]
    np.save(out_npy, feats.astype(np.float32))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
