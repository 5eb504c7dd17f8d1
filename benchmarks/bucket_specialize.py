"""Is a kernel specialized to one static shape faster than the shape-generic one?

Tuning times candidates at a fixed bucket (B4 H16 S4096); the shipped kernel keeps B, H, Sq,
Sk symbolic.  This builds both from the same knobs (the tuning log's, else defaults), times
them on the bucket's shape with triton's do_bench (median) on the GPU, checks both against
each other, and prints the ratio: a length-dispatched specialized kernel is only worth it if
this says so.

    python benchmarks/bucket_specialize.py [--head-dim 128] [--dtype bf16] [--causal]
"""

import argparse
import math

import torch
import tvm
from triton.testing import do_bench

from tvm_flash.build import Workload, make_target, scheduled_func
from tvm_flash.tune import BUCKETS, tuned_knobs


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--causal", action="store_true")
    a = p.parse_args()
    dtype = {"bf16": "bfloat16", "fp16": "float16"}[a.dtype]
    wl = Workload(a.head_dim, dtype, a.causal)
    major, minor = torch.cuda.get_device_capability()
    target = make_target("cuda", f"sm_{major}{minor}")
    knobs = tuned_knobs(wl, target)
    b, hq, hkv, sq, sk = BUCKETS["cuda"]
    d = a.head_dim
    generic = scheduled_func(wl, "cuda", knobs)
    qp, kp = generic.params[0], generic.params[1]
    static = generic.specialize({qp: tvm.tirx.decl_buffer((b, hq, sq, d), dtype, "q"),
                                 kp: tvm.tirx.decl_buffer((b, hkv, sk, d), dtype, "k")})
    kernels = {name: tvm.compile(tvm.IRModule({"flash_fwd": f}), target=target)["flash_fwd"]
               for name, f in (("generic", generic), ("static", static))}
    tdt = getattr(torch, dtype)
    q = torch.randn(b, hq, sq, d, device="cuda", dtype=tdt)
    k, v = (torch.randn(b, hkv, sk, d, device="cuda", dtype=tdt) for _ in range(2))
    outs, ms = {}, {}
    for name, kern in kernels.items():
        o = torch.full_like(q, float("nan"))
        lse = torch.empty(b, hq, sq, device="cuda")
        ms[name] = do_bench(lambda: kern(q, k, v, o, lse, 1 / math.sqrt(d)), warmup=25, rep=200, return_mode="median")
        outs[name] = o
    same = (outs["generic"] - outs["static"]).abs().max().item()
    flops = 4 * b * hq * sq * sk * d / (2 if a.causal else 1)
    print(f"{torch.cuda.get_device_name()} {wl.name} B{b} H{hq} S{sq} knobs {knobs or 'defaults'}")
    for name in ms:
        print(f"  {name:8s} {ms[name]:.4f} ms  {flops / ms[name] / 1e9:.1f} TFLOP/s")
    print(f"  static/generic speed: {ms['generic'] / ms['static']:.3f}x; max |diff| {same:.2e}")


if __name__ == "__main__":
    main()
