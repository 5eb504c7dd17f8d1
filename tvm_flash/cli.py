"""Command line: ``tvm-flash demo`` (also ``python -m tvm_flash``) and ``tvm-flash info``.

``demo`` runs attention on a default shape on CUDA when present (else the
CPU), checks it against the float64 reference and prints the error and
TFLOP/s beside torch's ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _median_ms(fn, device, reps):
    import torch

    fn()  # warm-up (and first-call compile)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def demo(args) -> int:
    import torch
    import torch.nn.functional as F

    import tvm_flash
    from tvm_flash.reference import attention_ref

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    b, h, s, d = args.batch or (4 if on_gpu else 1), args.heads or (16 if on_gpu else 4), args.seq or (2048 if on_gpu else 512), args.head_dim
    dtype = getattr(torch, DTYPES[args.dtype or ("fp16" if on_gpu else "fp32")])
    name = torch.cuda.get_device_name(device) if on_gpu else "CPU"
    print(f"tvm_flash {tvm_flash.__version__} on {name}: B={b} H={h} S={s} D={d} {dtype} causal={args.causal}")

    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    q, k, v = (torch.randn(b, h, s, d, generator=gen).to(device, dtype) for _ in range(3))
    t0 = time.perf_counter()
    out = tvm_flash.attention(q, k, v, causal=args.causal)
    if on_gpu:
        torch.cuda.synchronize()
    print(f"first call (build or load from cache): {time.perf_counter() - t0:.2f} s")

    # Reference on the first batch element, two heads (float64 on the CPU).
    ref, _ = attention_ref(q[:1, :2], k[:1, :2], v[:1, :2], causal=args.causal)
    ours_err = (out[:1, :2].double().cpu() - ref).abs().max().item()
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=args.causal)
    sdpa_err = (sdpa[:1, :2].double().cpu() - ref).abs().max().item()
    bound = 1e-5 if dtype == torch.float32 else 2 * sdpa_err + 1e-6
    ok = ours_err <= bound
    print(f"max abs error vs float64 reference: tvm_flash {ours_err:.2e}, torch SDPA {sdpa_err:.2e} -> {'OK' if ok else 'FAIL'}")

    flops = 4 * b * h * s * s * d / (2 if args.causal else 1)
    for label, fn in (
        ("tvm_flash", lambda: tvm_flash.attention(q, k, v, causal=args.causal)),
        ("torch SDPA", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=args.causal)),
    ):
        ms = _median_ms(fn, device, args.reps)
        print(f"{label:11s} {ms:9.3f} ms  {flops / ms / 1e9:9.3f} TFLOP/s  (median of {args.reps})")
    return 0 if ok else 1


def info(args) -> int:
    import tvm

    import tvm_flash
    from tvm_flash.build import cache_dir

    print(f"tvm_flash {tvm_flash.__version__}, TVM {tvm.__version__}, CUDA runtime enabled: {tvm.runtime.enabled('cuda')}")
    print(f"kernel cache: {cache_dir()}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tvm-flash", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd")
    p = sub.add_parser("demo", help="run, check and time attention on a default shape")
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--dtype", choices=sorted(DTYPES))
    p.add_argument("--batch", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    sub.add_parser("info", help="versions and cache location")
    args = parser.parse_args(argv)
    if args.cmd in (None, "demo"):
        if args.cmd is None:
            args = parser.parse_args(["demo"])
        return demo(args)
    return info(args)


if __name__ == "__main__":
    sys.exit(main())
