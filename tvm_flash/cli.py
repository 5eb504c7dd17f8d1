"""Command line: ``tvm-flash demo|info|tune|export`` (also ``python -m tvm_flash``).

``demo`` runs attention on a default shape on CUDA when present (else the
CPU), checks it against the float64 reference and prints the error and
TFLOP/s beside torch's ``F.scaled_dot_product_attention``.  ``tune`` searches a
workload's kernel knobs with MetaSchedule and writes its tuning log (``tvm_flash.tune``).
``export`` builds workloads from their logs into a folder that ``tvm_flash.load``
opens without the TVM compiler (``build.export``, ``runtime``).  ``info`` prints
versions, the target, the tuned workloads and the cache location.
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


def kernel_table(kind: str, arch: str | None) -> list[str]:
    """Which schedule module runs the forward and the backward here, per dtype (head dims 64/128)."""
    from . import schedules

    lines = ["kernels here (forward / backward schedule module):"]
    for dtype in ("float16", "bfloat16", "float32"):
        for d in (64, 128):
            fwd = schedules.for_target(kind, dtype, d, arch).__name__.rsplit(".", 1)[-1]
            bwd = schedules.backward_for_target(kind, dtype, d, arch).__name__.rsplit(".", 1)[-1]
            lines.append(f"  {dtype:8s} head dim {d:3d}: {fwd} / {bwd}")
    return lines


def info(args) -> int:
    import tvm

    import tvm_flash
    from tvm_flash.build import cache_dir

    print(f"tvm_flash {tvm_flash.__version__}, TVM {tvm.__version__}, CUDA runtime enabled: {tvm.runtime.enabled('cuda')}")
    target, kind, arch = "llvm (CPU)", "llvm", None
    try:
        import torch

        if torch.cuda.is_available():
            from .ops import _cuda_arch

            kind, arch = "cuda", _cuda_arch(None)
            target = f"cuda {arch} ({torch.cuda.get_device_name()})"
    except ImportError:
        pass
    print(f"target here: {target}")
    for line in kernel_table(kind, arch):
        print(line)
    print(f"kernel cache: {cache_dir()}")
    from tvm_flash.tune import list_logs, logs_root

    logs = list_logs()
    print(f"tuning logs: {logs_root()} ({len(logs)} tuned workload{'s' if len(logs) != 1 else ''})")
    for tag, name in logs:
        print(f"  {tag:12s} {name}")
    return 0


def _workloads(args):
    from tvm_flash.build import Workload

    causal = {"no": [False], "yes": [True], "both": [False, True]}[args.causal]
    return [Workload(d, DTYPES[t], c) for d in args.head_dim for t in args.dtype for c in causal]


def export(args) -> int:
    from tvm_flash import tune as tuning
    from tvm_flash.build import export as build_export

    target = tuning.make_target(args.target, args.arch if args.target == "cuda" else None)
    workloads = _workloads(args)
    from tvm_flash.ops import MAX_HEAD_DIM, MIN_HEAD_DIM  # the rule attention() enforces

    bad = [d for d in args.head_dim if not (MIN_HEAD_DIM <= d <= MAX_HEAD_DIM and d % 8 == 0)]
    if bad:
        print(f"tvm-flash export: head dims must be multiples of 8 in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {bad}",
              file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        folder = build_export(workloads, target, args.out)
    except ValueError as err:
        print(f"tvm-flash export: {err}", file=sys.stderr)
        return 2
    print(f"exported {len(workloads)} kernels for {tuning.target_tag(target)} to {folder} in {time.perf_counter() - t0:.0f} s:")
    import json

    for entry in json.loads((folder / "manifest.json").read_text())["kernels"]:
        print(f"  {entry['name']:28s} {'tuned' if entry['tuned'] else 'default'} knobs {entry['knobs']}")
    print(f"use: tvm_flash.load({str(folder)!r}) (or TVM_FLASH_KERNELS={folder}); no TVM compiler needed")
    return 0


def tune(args) -> int:
    from tvm_flash import tune as tuning
    from tvm_flash.build import Workload

    if bool(args.rpc_tracker) != bool(args.rpc_key):
        print("tvm-flash tune: --rpc-tracker and --rpc-key go together", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype or ("bf16" if args.target == "cuda" else "fp32")]
    workload = Workload(args.head_dim, dtype, args.causal)
    target = tuning.tune_target(args.target, args.arch)
    t0 = time.perf_counter()
    try:
        knobs = tuning.tune(
            workload, target, args.trials, trials_per_iter=args.trials_per_iter, gqa=args.gqa, min_gain=args.min_gain,
            rpc_tracker=args.rpc_tracker, rpc_key=args.rpc_key,
        )
    except ValueError as err:
        print(f"tvm-flash tune: {err}", file=sys.stderr)
        return 2
    print(f"tuned {tuning.workload_name(workload)} on {tuning.target_tag(target)} in {time.perf_counter() - t0:.0f} s: {knobs}")
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
    sub.add_parser("info", help="versions, cache location, tuned workloads")
    t = sub.add_parser("tune", help="tune a workload's kernel knobs with MetaSchedule; writes its tuning log")
    t.add_argument("--head-dim", type=int, required=True)
    t.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on cuda, fp32 on llvm")
    t.add_argument("--causal", action="store_true")
    t.add_argument("--gqa", type=int, default=1, metavar="G",
                   help="time with G query heads per key/value head (the log serves every G)")
    t.add_argument("--trials", type=int, default=32)
    t.add_argument("--trials-per-iter", type=int, help="candidates built and timed per batch (default: all at once)")
    t.add_argument("--min-gain", type=float, default=0.01, metavar="F",
                   help="keep the default knobs unless a candidate is faster by more than F (default 0.01 = 1%%)")
    t.add_argument("--target", choices=["cuda", "llvm"], default="cuda")
    t.add_argument("--arch", default="sm_90a", help="CUDA arch (default sm_90a: Hopper's wgmma kernel; sm_90 for the mma.sync one)")
    t.add_argument("--rpc-tracker", metavar="HOST:PORT", help="time candidates on the RPC fleet behind this tracker")
    t.add_argument("--rpc-key", metavar="KEY", help="device key of the RPC servers")
    e = sub.add_parser("export", help="build workloads from their tuning logs into DIR for tvm_flash.load (no compiler)")
    e.add_argument("--out", required=True, metavar="DIR")
    e.add_argument("--head-dim", type=int, nargs="+", default=[64, 128])
    e.add_argument("--dtype", choices=sorted(DTYPES), nargs="+", default=["bf16", "fp16"])
    e.add_argument("--causal", choices=["no", "yes", "both"], default="both")
    e.add_argument("--target", choices=["cuda", "llvm"], default="cuda")
    e.add_argument("--arch", default="sm_90a", help="CUDA arch (default sm_90a: Hopper's wgmma kernel; sm_90 for the mma.sync one)")
    args = parser.parse_args(argv)
    if args.cmd in (None, "demo"):
        if args.cmd is None:
            args = parser.parse_args(["demo"])
        return demo(args)
    if args.cmd == "tune":
        return tune(args)
    if args.cmd == "export":
        return export(args)
    return info(args)


if __name__ == "__main__":
    sys.exit(main())
