"""Top kernels by total GPU time from `ncu --csv --page raw --metrics gpu__time_duration.sum` output.

Usage: python3 ncu_summary.py NCU.csv [TOP]   (plain python3, no packages)
"""
import csv
import sys
from collections import defaultdict


def main():
    path, top = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 30
    lines = open(path, errors="replace").read().splitlines()
    start = next((i for i, l in enumerate(lines) if l.startswith('"ID"')), None)
    if start is None:
        print("no ncu CSV rows in", path)
        return
    rows = list(csv.DictReader(lines[start:]))
    total, count = defaultdict(float), defaultdict(int)
    for r in rows:
        try:
            t = float(r["gpu__time_duration.sum"].replace(",", ""))
        except (AttributeError, KeyError, ValueError):
            continue  # the units row, or a last row cut off by a timeout
        name = r.get("Kernel Name", "?")[:90]
        total[name] += t
        count[name] += 1
    unit = rows[0].get("gpu__time_duration.sum", "") if rows else ""
    grand = sum(total.values())
    print(f"{len(rows) - 1} kernel launches, {grand:,.0f} {unit} of GPU time in total")
    print(f"| kernel | launches | total ({unit}) | share |")
    print("| --- | ---: | ---: | ---: |")
    for name, t in sorted(total.items(), key=lambda kv: -kv[1])[:top]:
        print(f"| `{name}` | {count[name]} | {t:,.0f} | {100 * t / grand:.1f}% |")


if __name__ == "__main__":
    main()
