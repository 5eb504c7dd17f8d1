"""Markdown table of a tuned-vs-default run: one row per (dtype, head dim, causal) group.

    python benchmarks/bench_forward.py --sweep fa --impls tvm_flash,tvm_default,sdpa_flash,sdpa_cudnn --tag tuned
    python benchmarks/tuned_table.py benchmarks/results/<card>-tuned.json

Columns: median TFLOP/s over the sweep's sequence lengths of the default-knob kernel, the
tuned kernel (tuning logs applied), SDPA flash (FA2) and SDPA cuDNN, then tuned/default
(median and min over the points) and tuned/FA2 (median, min).
"""

import json
import statistics
import sys
from collections import defaultdict


def main(path: str) -> None:
    data = json.load(open(path))
    groups = defaultdict(list)
    for p in data["points"]:
        groups[(p["dtype"], p["headdim"], p["causal"])].append(p["results"])
    names = ("tvm_default", "tvm_flash", "sdpa_flash", "sdpa_cudnn")
    print(f"{data['meta'].get('device', '')} ({path})\n")
    print("| dtype | hd | causal | default | tuned | FA2 | cuDNN | tuned/default med (min) | tuned/FA2 med (min) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (dt, hd, causal), pts in groups.items():
        tf = {n: [r[n]["tflops"] for r in pts if r.get(n, {}).get("status") == "ok"] for n in names}
        r_def = [r["tvm_flash"]["tflops"] / r["tvm_default"]["tflops"] for r in pts]
        r_fa = [r["tvm_flash"]["tflops"] / r["sdpa_flash"]["tflops"] for r in pts]
        cells = " | ".join(f"{statistics.median(tf[n]):.0f}" for n in names)
        print(f"| {dt} | {hd} | {'yes' if causal else 'no'} | {cells} | "
              f"{statistics.median(r_def):.3f} ({min(r_def):.3f}) | {statistics.median(r_fa):.3f} ({min(r_fa):.3f}) |")


if __name__ == "__main__":
    main(sys.argv[1])
