"""Where the wgmma kernel's time goes: time variants that leave one stage of the loop out.

Each variant is ``schedules/cuda_wgmma.py`` built with ``ablate=<letters>`` (e: no exp2 in the
softmax, p: no P V wgmma, q: no Q K^T wgmma, o: no O / LSE stores, the threads still computing
them, with ``"tma_store": 0``; for the all-threads loop without overlap also s: no
__syncthreads in the loop, l: no K/V refill loads); its output is wrong by design, only its
time counts.  The difference to the full kernel is an upper bound of
what that stage costs on the critical path.  Prints TFLOP/s at the
kernel's nominal FLOP count (median of do_bench), beside SDPA's flash and cuDNN backends.

    python3 benchmarks/ablate.py --hd 128 --knobs '{"num_wg": 3, "block_n": 96}' --variants ',e,l,s,p,q,pq'
    python3 benchmarks/ablate.py --ncu        # one launch of the full kernel, for ncu
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import tvm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from schedules import cuda_wgmma  # noqa: E402

TARGET = {"kind": "cuda", "arch": "sm_90a", "max_shared_memory_per_block": 232448}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hd", type=int, default=128)
    ap.add_argument("--causal", type=int, default=0)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--knobs", default="{}")
    ap.add_argument("--variants", default=",e,l,s,p,q,pq,elsp")
    ap.add_argument("--ncu", action="store_true")
    a = ap.parse_args()
    from triton.testing import do_bench
    b, h, s, d = 16384 // a.seq, 2048 // a.hd, a.seq, a.hd
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    o, lse = torch.empty_like(q), torch.empty(b, h, s, device="cuda")
    flops = 4 * b * h * s * s * d / (2 if a.causal else 1)
    knobs = json.loads(a.knobs)
    print(torch.cuda.get_device_name(), f"B{b} H{h} S{s} D{d} causal={a.causal} knobs={knobs}", flush=True)
    for var in ([""] if a.ncu else a.variants.split(",")):
        f = cuda_wgmma.schedule(d, "bfloat16", bool(a.causal), **knobs, ablate=var)
        fn = tvm.compile(tvm.IRModule({"flash_fwd": f}), target=tvm.target.Target(TARGET))["flash_fwd"]
        if a.ncu:
            fn(q, k, v, o, lse, 1 / math.sqrt(d))
            torch.cuda.synchronize()
            return
        ms = do_bench(lambda: fn(q, k, v, o, lse, 1 / math.sqrt(d)), warmup=25, rep=100, return_mode="median")
        print(f"  ablate={var or '-':6s} {ms * 1e3:8.1f} us  {flops / ms / 1e9:6.0f} TFLOP/s", flush=True)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for name, be in (("fa2", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        with sdpa_kernel(be):
            ms = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=bool(a.causal)),
                          warmup=25, rep=100, return_mode="median")
        print(f"  {name:13s} {ms * 1e3:8.1f} us  {flops / ms / 1e9:6.0f} TFLOP/s", flush=True)


if __name__ == "__main__":
    main()
