"""Host-side cost of one tvm_flash call on a tiny problem, beside SDPA (where launch cost, not the
kernel, decides the time: e.g. batch 1, 12 heads, seq 512, hd 64).

Prints per call: host time (perf_counter over many calls, no synchronization inside the loop),
do_bench time (CUDA events), for tvm_flash.attention, the raw compiled kernel, and SDPA's flash
and cuDNN backends; then the same for forward + backward (``out.backward(dout)``, inputs that
require grad) of tvm_flash and the two SDPA backends.

    python3 benchmarks/overhead.py --shape 1,12,512,64
"""

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tvm_flash  # noqa: E402
from tvm_flash import ops  # noqa: E402
from tvm_flash.workload import Workload  # noqa: E402


def host_us(fn, n=2000):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1,12,512,64")
    ap.add_argument("--causal", type=int, default=0)
    ap.add_argument("--profile", action="store_true", help="also cProfile 2000 tvm_flash.attention calls")
    a = ap.parse_args()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench
    b, h, s, d = map(int, a.shape.split(","))
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    o, lse = torch.empty_like(q), torch.empty(b, h, s, device="cuda")
    kern = ops._kernel("cuda", q.device.index, Workload(d, "bfloat16", bool(a.causal)))
    fns = {
        "tvm_flash.attention": lambda: tvm_flash.attention(q, k, v, causal=bool(a.causal)),
        "raw kernel": lambda: kern(q, k, v, o, lse, 1 / math.sqrt(d)),
    }
    for name, be in (("sdpa flash", SDPBackend.FLASH_ATTENTION), ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION)):
        def f(be=be):
            with sdpa_kernel(be):
                return F.scaled_dot_product_attention(q, k, v, is_causal=bool(a.causal))
        fns[name] = f
    print(torch.cuda.get_device_name(), f"B{b} H{h} S{s} D{d} causal={a.causal}")
    for name, fn in fns.items():
        print(f"  {name:22s} host {host_us(fn):7.1f} us/call   do_bench {do_bench(fn, warmup=25, rep=100) * 1e3:7.1f} us")
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    dout = torch.randn_like(q)
    train = {"tvm_flash fwd+bwd": lambda: tvm_flash.attention(qg, kg, vg, causal=bool(a.causal)).backward(dout)}
    for name, be in (("sdpa flash fwd+bwd", SDPBackend.FLASH_ATTENTION), ("sdpa cudnn fwd+bwd", SDPBackend.CUDNN_ATTENTION)):
        def g(be=be):
            with sdpa_kernel(be):
                F.scaled_dot_product_attention(qg, kg, vg, is_causal=bool(a.causal)).backward(dout)
        train[name] = g
    for name, fn in train.items():
        print(f"  {name:22s} host {host_us(fn, 500):7.1f} us/call   do_bench "
              f"{do_bench(fn, warmup=25, rep=100, grad_to_none=[qg, kg, vg]) * 1e3:7.1f} us")
    if a.profile:
        import cProfile
        import pstats
        fn = fns["tvm_flash.attention"]
        with cProfile.Profile() as prof:
            for _ in range(2000):
                fn()
        pstats.Stats(prof).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
