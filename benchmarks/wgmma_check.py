"""Check and time the Hopper wgmma kernel (``schedules/cuda_wgmma.py``) on the GPU, beside SDPA.

For each knob set: accuracy against float64 attention on fresh random inputs (output poisoned
with NaN first) on awkward shapes (tails, Sq != Sk, GQA, causal), then TFLOP/s at one size,
with SDPA's flash (FA2) and cuDNN backends timed in the same process (median of do_bench).

    python3 benchmarks/wgmma_check.py                      # default knobs, hd 64/128, bf16/fp16
    python3 benchmarks/wgmma_check.py --knobs '[{"block_n": 64}, {"num_wg": 3, "block_n": 96}]'
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import tvm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from schedules import cuda_wgmma  # noqa: E402
from tvm_flash.build import make_target  # noqa: E402
from tvm_flash.reference import attention_ref  # noqa: E402

DT = {"bf16": torch.bfloat16, "fp16": torch.float16}
SHAPES = [  # B, Hq, Hkv, Sq, Sk
    (2, 4, 4, 256, 256),
    (1, 8, 2, 333, 517),
    (2, 3, 1, 1000, 1000),
    (1, 2, 2, 77, 1029),
    (1, 2, 2, 1029, 77),
]


def build(hd, dtype, causal, knobs):
    f = cuda_wgmma.schedule(hd, dtype, causal, **knobs)
    return tvm.compile(tvm.IRModule({"flash_fwd": f}), target=make_target("cuda", "sm_90a"))["flash_fwd"]


def check(fn, hd, dt, causal):
    worst = 0.0
    for (b, hq, hkv, sq, sk) in SHAPES:
        q = torch.randn(b, hq, sq, hd, device="cuda", dtype=DT[dt])
        k = torch.randn(b, hkv, sk, hd, device="cuda", dtype=DT[dt])
        v = torch.randn(b, hkv, sk, hd, device="cuda", dtype=DT[dt])
        o = torch.full_like(q, float("nan"))
        lse = torch.full((b, hq, sq), float("nan"), device="cuda")
        scale = 1 / math.sqrt(hd)
        fn(q, k, v, o, lse, scale)
        torch.cuda.synchronize()
        ro, rl = attention_ref(q, k, v, causal=causal, scale=scale)  # float64, on the CPU
        g = hq // hkv
        so = F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                            is_causal=causal, scale=scale)
        err = (o.double().cpu() - ro).abs().max().item()
        serr = (so.double().cpu() - ro).abs().max().item()
        lerr = (lse.double().cpu() - rl).abs().max().item()
        ok = err <= 2 * serr + 1e-6 and lerr < 1e-3 and not torch.isnan(o).any()
        worst = max(worst, err / max(serr, 1e-9))
        if not ok:
            print(f"    FAIL {dt} hd{hd} causal={causal} {(b, hq, hkv, sq, sk)}: err {err:.3e} "
                  f"(sdpa {serr:.3e}) lse err {lerr:.2e} nan={torch.isnan(o).any().item()}")
            return False, worst
    return True, worst


def bench(fn, hd, dt, causal, b, h, s):
    from triton.testing import do_bench
    q, k, v = (torch.randn(b, h, s, hd, device="cuda", dtype=DT[dt]) for _ in range(3))
    o = torch.empty_like(q)
    lse = torch.empty(b, h, s, device="cuda")
    scale = 1 / math.sqrt(hd)
    flops = 4 * b * h * s * s * hd / (2 if causal else 1)
    tf = lambda ms: flops / ms / 1e9  # noqa: E731
    res = {"tvm": tf(do_bench(lambda: fn(q, k, v, o, lse, scale), warmup=25, rep=100, return_mode="median"))}
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for name, be in (("fa2", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        with sdpa_kernel(be):
            res[name] = tf(do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                                    warmup=25, rep=100, return_mode="median"))
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--knobs", default="[{}]", help="JSON list of knob dicts")
    ap.add_argument("--hd", default="64,128")
    ap.add_argument("--dtypes", default="bf16,fp16")
    ap.add_argument("--causal", default="0,1")
    ap.add_argument("--seq", default="4096", help="comma-separated sequence lengths (16k tokens each)")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), flush=True)
    rows = []
    for hd in map(int, args.hd.split(",")):
        for dt in args.dtypes.split(","):
            for causal in map(int, args.causal.split(",")):
                for kn in json.loads(args.knobs):
                    t0 = time.time()
                    try:
                        fn = build(hd, {"bf16": "bfloat16", "fp16": "float16"}[dt], bool(causal), kn)
                    except Exception as e:  # noqa: BLE001
                        print(f"{dt} hd{hd} c{causal} {kn}: BUILD FAIL {str(e)[-300:]}", flush=True)
                        continue
                    ok, worst = check(fn, hd, dt, bool(causal))
                    row = {"hd": hd, "dtype": dt, "causal": causal, "knobs": kn, "ok": ok, "err_ratio": worst}
                    extra = ""
                    for seq in (map(int, args.seq.split(",")) if ok and not args.no_bench else ()):
                        res = bench(fn, hd, dt, bool(causal), 16384 // seq, 2048 // hd, seq)
                        row[f"s{seq}"] = res
                        extra += (f"\n    s{seq}: tvm {res['tvm']:.0f} fa2 {res['fa2']:.0f} cudnn {res['cudnn']:.0f}"
                                  f" TFLOP/s  x{res['tvm'] / res['fa2']:.3f} FA2 x{res['tvm'] / res['cudnn']:.3f} cuDNN")
                    rows.append(row)
                    print(f"{dt} hd{hd} c{causal} {kn}: ok={ok} err/sdpa={worst:.2f} ({time.time() - t0:.1f}s){extra}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
