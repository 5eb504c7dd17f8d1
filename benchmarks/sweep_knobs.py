"""Time a CUDA kernel under several knob settings against PyTorch's own attention.

Hand measurement of a schedule's knobs, used to pick its ``default_knobs``.  The grid is
the schedule module's ``KNOB_SPACE`` (``cuda_tc`` for fp16/bf16, ``cuda_ffma`` for fp32;
``--knob NAME=V1,V2`` narrows it; ``--sets JSON`` gives an explicit list of knob dicts instead).  The settings are compiled in parallel worker
processes into the disk cache, then each is checked against a float64 reference on one
head (output poisoned first) and timed with triton's ``do_bench`` (median) at 16k tokens,
hidden 2048.  Baselines in the same process: SDPA-flash (fp16/bf16), or naive
matmul-softmax-matmul and SDPA's memory-efficient backend (fp32):

    python3 benchmarks/sweep_knobs.py --head-dim 128 --seq 4096 [--causal] [--dtype bf16|fp16|fp32]
    python3 benchmarks/sweep_knobs.py --head-dim 128 --seq 512 --sets '[{}, {"num_wg": 1}]'
"""

import argparse
import concurrent.futures as cf
import itertools
import json
import math
import multiprocessing as mp

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from tvm_flash.build import Workload, get_kernel, make_target, schedule_module
from tvm_flash.reference import attention_ref

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
TC_GRID = {"block_m": [64, 128], "block_n": [32, 64, 128], "num_warps": [4, 8], "num_stages": [2, 3]}


def _build(args):
    work, arch, knobs = args
    try:
        get_kernel(work, make_target("cuda", arch), knobs)
        return None
    except Exception as err:  # knob sets the kernel rejects are reported and skipped
        return str(err).splitlines()[0][:100]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--knob", action="append", default=[], metavar="NAME=V1,V2", help="narrow one knob's values")
    ap.add_argument("--sets", help="JSON list of knob dicts to time (over the defaults) instead of a grid")
    ap.add_argument("--jobs", type=int, default=8, help="parallel compile processes")
    args = ap.parse_args()
    d, s = args.head_dim, args.seq
    dtype = DTYPES[args.dtype]
    b, h = 16384 // s, 2048 // d
    work = Workload(d, str(dtype).removeprefix("torch."), args.causal)
    from tvm_flash.ops import _cuda_arch

    arch = _cuda_arch(None)
    module = schedule_module(make_target("cuda", arch), work)
    grid = dict(TC_GRID if module.__name__.endswith("cuda_tc") else module.KNOB_SPACE)
    for spec in args.knob:
        name, values = spec.split("=")
        grid[name] = [int(x) for x in values.split(",")]
    settings = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    if args.sets:
        settings = json.loads(args.sets)

    with cf.ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
        errors = list(pool.map(_build, [(work, arch, kn) for kn in settings]))

    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=dtype) for _ in range(3))
    scale = 1 / math.sqrt(d)
    flops = 4 * b * h * s * s * d / (2 if args.causal else 1)
    ref, _ = attention_ref(q[:1, :1], k[:1, :1], v[:1, :1], causal=args.causal)
    head = f"{torch.cuda.get_device_name()} hd{d} {args.dtype} causal={args.causal} B{b} H{h} S{s}:"
    if dtype == torch.float32:
        def naive():
            sc = (q @ k.transpose(-1, -2)) * scale
            if args.causal:
                sc = sc.masked_fill(torch.ones(s, s, dtype=torch.bool, device="cuda").triu(1), float("-inf"))
            return sc.softmax(-1) @ v
        base = {"naive": naive}
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            ms = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=args.causal), return_mode="median")
        head += f" sdpa_mem_eff {flops / ms / 1e9:.1f}"
    else:
        base = {}
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            ms = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=args.causal), return_mode="median")
        head += f" sdpa_flash {flops / ms / 1e9:.1f}"
    for name, fn in base.items():
        try:
            ms = do_bench(fn, return_mode="median")
            head += f" {name} {flops / ms / 1e9:.1f}"
        except torch.OutOfMemoryError:
            head += f" {name} OOM"
        torch.cuda.empty_cache()
    print(head + " TFLOP/s", flush=True)

    for knobs, error in zip(settings, errors):
        if error:
            print(f"{knobs}: skipped ({error})")
            continue
        fn = get_kernel(work, make_target("cuda", arch), knobs)
        o = torch.full_like(q, float("nan"))
        lse = torch.empty(b, h, s, device="cuda", dtype=torch.float32)
        fn(q, k, v, o, lse, scale)
        err = (o[:1, :1].double().cpu() - ref).abs().max().item()
        ms = do_bench(lambda: fn(q, k, v, o, lse, scale), return_mode="median")
        print(f"{knobs}: {flops / ms / 1e9:6.1f} TFLOP/s  err {err:.1e}", flush=True)


if __name__ == "__main__":
    main()
