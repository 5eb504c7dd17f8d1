"""Time the CUDA tensor-core kernel under several knob settings against SDPA-flash.

Hand measurement of the schedule's knobs (block_m, block_n, num_warps,
num_stages), used to pick ``schedules/cuda_tc.default_knobs``.  Each setting is
compiled, checked against a float64 reference on one head, and timed with
triton's ``do_bench`` (median) at 16k tokens, hidden 2048:

    python3 benchmarks/sweep_knobs.py --head-dim 128 --seq 4096 [--causal] [--dtype bf16]
"""

import argparse
import itertools
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from tvm_flash.build import Workload, compile_kernel, make_target
from tvm_flash.reference import attention_ref

GRID = {"block_m": [64, 128], "block_n": [32, 64, 128], "num_warps": [4, 8], "num_stages": [2, 3]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--dtype", choices=["fp16", "bf16"], default="bf16")
    ap.add_argument("--causal", action="store_true")
    args = ap.parse_args()
    d, s = args.head_dim, args.seq
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    b, h = 16384 // s, 2048 // d
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=dtype) for _ in range(3))
    scale = 1 / math.sqrt(d)
    flops = 4 * b * h * s * s * d / (2 if args.causal else 1)
    ref, _ = attention_ref(q[:1, :1], k[:1, :1], v[:1, :1], causal=args.causal)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        ms = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=args.causal), return_mode="median")
    print(f"{torch.cuda.get_device_name()} hd{d} {args.dtype} causal={args.causal} B{b} H{h} S{s}: sdpa_flash {flops / ms / 1e9:.1f} TFLOP/s")
    work = Workload(d, str(dtype).removeprefix("torch."), args.causal)
    target = make_target("cuda", "sm_%d%d" % torch.cuda.get_device_capability())
    for values in itertools.product(*GRID.values()):
        knobs = dict(zip(GRID, values))
        try:
            fn = compile_kernel(work, target, knobs)["flash_fwd"]
        except Exception as err:  # knob sets the kernel rejects are skipped
            print(f"{knobs}: skipped ({str(err).splitlines()[0][:80]})")
            continue
        o = torch.full_like(q, float("nan"))
        lse = torch.empty(b, h, s, device="cuda", dtype=torch.float32)
        fn(q, k, v, o, lse, scale)
        err = (o[:1, :1].double().cpu() - ref).abs().max().item()
        ms = do_bench(lambda: fn(q, k, v, o, lse, scale), return_mode="median")
        print(f"{knobs}: {flops / ms / 1e9:6.1f} TFLOP/s  err {err:.1e}", flush=True)


if __name__ == "__main__":
    main()
