"""Times soxr HQ (what transformers' `load_audio` resamples with) on the signals of
`cargo bench -p afnext-audio --bench resample`, which times afnext on the same signals in the same run.

Usage: python resample_ref.py ITERATIONS IN_DIR
IN_DIR holds `<rate>.f32` (raw little-endian float32 mono); for each, writes `<rate>.soxr.f32`, soxr's output
padded/trimmed to ceil(n * 16000 / rate) as transformers does. Prints one JSON object: soxr's version and the
milliseconds (median, one thread: libsoxr's default) per rate.
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
import soxr


def main():
    iters, d = int(sys.argv[1]), Path(sys.argv[2])
    res = {"soxr": soxr.__version__, "ms": {}}
    for f in sorted(d.glob("*.f32")):
        if f.name.endswith(".soxr.f32"):
            continue
        rate = int(f.stem)
        x = np.fromfile(f, dtype="<f4")
        y = soxr.resample(x, rate, 16000, quality="HQ")
        ts = []
        for _ in range(iters):
            t0 = time.perf_counter()
            y = soxr.resample(x, rate, 16000, quality="HQ")
            ts.append((time.perf_counter() - t0) * 1e3)
        want = -(-len(x) * 16000 // rate)
        y = np.pad(y, (0, max(0, want - len(y))))[:want].astype("<f4")
        y.tofile(d / f"{rate}.soxr.f32")
        res["ms"][str(rate)] = float(np.median(ts))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
