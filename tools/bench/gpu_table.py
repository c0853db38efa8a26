"""Comparison table of the GPU benchmark (scripts/gpu-check.sh): afnext's `device` bench against
tools/bench/gpu_ref.py (transformers), both JSON objects on their files' last lines. Plain python3, no packages.

Usage: python3 gpu_table.py AFNEXT.json TRANSFORMERS.json
"""
import json
import sys


def last_json(path):
    try:
        lines = [l for l in open(path).read().splitlines() if l.strip().startswith("{")]
        return json.loads(lines[-1]) if lines else {}
    except (OSError, ValueError):
        return {}


def main():
    ours, ref = last_json(sys.argv[1]), last_json(sys.argv[2])
    card = ref.get("device_name", "unknown card")
    print(f"## {card}: afnext vs transformers {ref.get('transformers', '?')} "
          f"(torch {ref.get('torch', '?')}), bf16, random weights, full AF-Next size\n")
    print("| measurement | afnext | transformers | afnext / transformers |")
    print("| --- | ---: | ---: | ---: |")
    rows = [("encoder_windows_s", "audio windows/s, batch {}"),
            ("prefill_tok_s", "prefill tokens/s, {}-token prompt"),
            ("decode_tok_s", "decode tokens/s, batch {} (1 000-token contexts)")]
    for key, label in rows:
        a, b = ours.get(key, {}), ref.get(key, {})
        for k in sorted(set(a) | set(b), key=int):
            x, y = a.get(k), b.get(k)
            ratio = f"{x / y:.2f}x" if x and y else "n/a"
            fx = f"{x:,.1f}" if x else "failed"
            fy = f"{y:,.1f}" if y else "failed"
            print(f"| {label.format(k)} | {fx} | {fy} | {ratio} |")

    bw = ref.get("copy_gb_s")
    wbytes = ours.get("decoder_weight_bytes") or ref.get("decoder_weight_bytes")
    print()
    if bw and wbytes:
        # Decode at batch 1 reads every decoder matrix once per token; the copy counts bytes read + written,
        # so it is the rate at which the card moves bytes, the bound for streaming the weights.
        roof = bw * 1e9 / wbytes
        print(f"Roofline, decode at batch 1: {wbytes / 1e9:.2f} GB of weights per token at the measured "
              f"copy bandwidth {bw:,.0f} GB/s = {roof:.1f} tokens/s.")
        for name, d in (("afnext", ours), ("transformers", ref)):
            v = d.get("decode_tok_s", {}).get("1")
            if v:
                print(f"  {name}: {v:.1f} tokens/s = {100 * v / roof:.0f}% of the roofline")
    if ref.get("matmul_bf16_tflops"):
        print(f"bf16 matmul 8192^3 (torch): {ref['matmul_bf16_tflops']:.0f} TFLOP/s")


if __name__ == "__main__":
    main()
