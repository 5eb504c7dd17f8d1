"""Forward-pass benchmark: tvm_flash against PyTorch's attention implementations.

In one process, on the same random-normal inputs (fresh per shape), it times

    tvm_flash      tvm_flash.attention(q, k, v, causal=causal)
    naive          softmax(q @ k^T * scale + causal_mask) @ v  (materializes S x S)
    naive_eager    (optional) the same with the softmax in fp32, as Hugging Face
                   transformers' eager attention runs it (softmax(..., dtype=float32)
                   .to(dtype)): the "naive" most LLM code falls back to
    sdpa_flash     F.scaled_dot_product_attention, SDPBackend.FLASH_ATTENTION forced
    sdpa_cudnn     ... SDPBackend.CUDNN_ATTENTION forced
    sdpa_mem_eff   ... SDPBackend.EFFICIENT_ATTENTION forced

and reports, per shape and implementation:
  * median time of triton.testing.do_bench (CUDA events; L2 flushed per call),
  * TFLOP/s with FLOPs = 4*B*H*Sq*Sk*D, halved when causal,
  * peak extra memory: torch.cuda.max_memory_allocated() during one call, minus
    what was allocated before the call (inputs, causal mask), minus the output,
  * accuracy: max |out - ref| of tvm_flash and of SDPA (default backend) in the
    same dtype against a float64 reference computed in chunks on the GPU;
    "ok" when ours <= 2x SDPA's error (the flash-attention test suite's rule);
    fp32: "ok" when ours <= 1e-5 (the project's bound).
An out-of-memory or a backend that refuses a case is recorded as a result and
the run goes on; so does a failing `import tvm_flash`.

Sweeps (q, k, v are [B, H, S, D], self-attention, Sq = Sk = S):
  --sweep fa    (default) the FlashAttention papers' sweep: 16384 tokens per
                batch (B = 16384 // S), hidden 2048 (H = 2048 // D), D in
                {64, 128}, S in {512 .. 16384}, causal and not.
  --grid seed   batch {1,4,8,16} x S {512..4096} x hidden 768 (12x64),
                1024 (16x64), 2048 (16x128), 4096 (32x128); non-causal.
  --quick       only S in {1024, 4096}.
  --seqlens     an explicit comma list of S (overrides --quick).
  --headdims    the FA sweep's head dims (default 64,128), e.g. 32,96,256.
  --dtype fp32  tvm_flash's FFMA path (slow); SDPA's flash and cuDNN backends
                refuse fp32, which is recorded as an error result ("ERR").

Output: one line per point on stdout as it finishes, then a summary table per
(dtype, heads, head dim, causal) group with speed ratios of tvm_flash (TFLOP/s
of ours / theirs, > 1 means tvm_flash is faster). Full detail goes to
<out>/<card>[-quick|-seed].json and .md, rewritten after every point.

Run (on the GPU machine, TVM and the package on PYTHONPATH):
    python3 benchmarks/bench_forward.py                        # ~6 min on H100
    python3 benchmarks/bench_forward.py --quick                # ~2 min
    python3 benchmarks/bench_forward.py --dtype bf16 --impls tvm_flash,sdpa_flash
    python3 benchmarks/bench_forward.py --grid seed
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

DEVICE = "cuda"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FP32_MAX_ERR = 1e-5
IMPLS = ("tvm_flash", "naive", "sdpa_flash", "sdpa_cudnn", "sdpa_mem_eff")
# tvm_flash with the schedule's default knobs (tuning logs ignored); naive with an fp32 softmax
OPTIONAL = ("tvm_default", "naive_eager")
SHORT = {"tvm_flash": "tvm", "tvm_default": "tvm-def", "naive": "naive", "naive_eager": "eager", "sdpa_flash": "fa2",
         "sdpa_cudnn": "cudnn", "sdpa_mem_eff": "meff"}
SDPA_BACKENDS = {"sdpa_flash": SDPBackend.FLASH_ATTENTION,
                 "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
                 "sdpa_mem_eff": SDPBackend.EFFICIENT_ATTENTION}

FA_TOKENS, FA_HIDDEN = 16384, 2048
FA_HEADDIMS = (64, 128)
FA_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
SEED_BATCHES = (1, 4, 8, 16)
SEED_SEQLENS = (512, 1024, 2048, 4096)
SEED_HEADS = ((12, 64), (16, 64), (16, 128), (32, 128))  # hidden 768, 1024, 2048, 4096
QUICK_SEQLENS = (1024, 4096)
REF_CHUNK_ELEMS = 1 << 27  # float64 scores per reference chunk (1 GiB)
MIB = 1 << 20


# --------------------------------------------------------------------------- shapes

@dataclass(frozen=True)
class Shape:
    batch: int
    heads: int
    seqlen: int
    headdim: int
    causal: bool

    def flops(self) -> float:
        """Forward FLOPs as the field counts them: 4*B*H*Sq*Sk*D, halved when causal."""
        f = 4.0 * self.batch * self.heads * self.seqlen * self.seqlen * self.headdim
        return f / 2 if self.causal else f

    def label(self) -> str:
        return (f"hd{self.headdim:<3d} {'causal' if self.causal else 'full  '} "
                f"B{self.batch:<2d} H{self.heads:<2d} S{self.seqlen:<5d}")


def fa_sweep(seqlens, headdims=FA_HEADDIMS) -> list[Shape]:
    return [Shape(FA_TOKENS // s, FA_HIDDEN // d, s, d, causal)
            for d in headdims for causal in (False, True) for s in seqlens]


def seed_grid(seqlens) -> list[Shape]:
    return [Shape(b, h, s, d, False)
            for h, d in SEED_HEADS for b in SEED_BATCHES for s in seqlens]


def make_inputs(shape: Shape, dtype: torch.dtype, seed: int):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    size = (shape.batch, shape.heads, shape.seqlen, shape.headdim)
    return tuple(torch.randn(size, dtype=dtype, device=DEVICE, generator=gen) for _ in range(3))


# --------------------------------------------------------------------------- implementations

@dataclass
class Impl:
    """`make(q, k, v, causal)` prepares (outside timing) and returns the callable to time."""
    name: str
    make: Callable
    context: Callable[[], ContextManager] = contextlib.nullcontext
    unavailable: str | None = None  # why it cannot run at all (e.g. import error)


def import_tvm_flash():
    """Return (module, None) or (None, error message)."""
    try:
        import tvm_flash
        return tvm_flash, None
    except Exception as exc:  # report and go on with the others
        return None, f"import tvm_flash failed: {type(exc).__name__}: {exc}"


def naive_attention(q, k, v, scale, mask):
    scores = (q @ k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + mask
    return torch.softmax(scores, -1) @ v


def naive_eager_attention(q, k, v, scale, mask):
    """Hugging Face transformers' eager attention (its Llama ``eager_attention_forward``)."""
    scores = (q @ k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + mask
    return torch.softmax(scores, -1, dtype=torch.float32).to(q.dtype) @ v


def make_naive(q, k, v, causal, fn=naive_attention):
    s_q, s_k = q.shape[-2], k.shape[-2]
    mask = (torch.full((s_q, s_k), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
            if causal else None)
    scale = 1.0 / math.sqrt(q.shape[-1])
    return lambda: fn(q, k, v, scale, mask)


def make_sdpa(q, k, v, causal):
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def make_tvm_default(q, k, v, causal):
    """tvm_flash's kernel built with the schedule's default knobs (tuning logs ignored)."""
    from tvm_flash.build import Workload, effective_knobs, get_kernel, make_target
    from tvm_flash.ops import _cuda_arch

    wl = Workload(q.shape[-1], str(q.dtype).removeprefix("torch."), bool(causal))
    target = make_target("cuda", _cuda_arch(q.device.index))
    kernel = get_kernel(wl, target, effective_knobs(wl, target, None))
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    scale = 1.0 / math.sqrt(q.shape[-1])
    return lambda: (kernel(q, k, v, out, lse, scale), out)[1]


def build_impls(names, tvm_module, tvm_error) -> list[Impl]:
    impls = []
    for name in names:
        if name == "tvm_flash":
            make = (lambda q, k, v, causal: lambda: tvm_module.attention(q, k, v, causal=causal))
            impls.append(Impl(name, make, unavailable=tvm_error))
        elif name == "tvm_default":
            impls.append(Impl(name, make_tvm_default, unavailable=tvm_error))
        elif name == "naive":
            impls.append(Impl(name, make_naive))
        elif name == "naive_eager":
            impls.append(Impl(name, lambda q, k, v, causal: make_naive(q, k, v, causal, naive_eager_attention)))
        else:
            backend = SDPA_BACKENDS[name]
            impls.append(Impl(name, make_sdpa, context=lambda b=backend: sdpa_kernel(b)))
    return impls


# --------------------------------------------------------------------------- measurement

def free_memory():
    gc.collect()
    torch.cuda.empty_cache()


def device_used_bytes() -> int:
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return total - free


def first_call(fn) -> tuple[float, int]:
    """One synchronized call: its seconds (including any lazy compilation) and the device
    memory it left taken outside torch's caching allocator, which max_memory_allocated
    cannot see (a TVM workspace pool; also CUDA modules loaded lazily)."""
    used_before, reserved_before = device_used_bytes(), torch.cuda.memory_reserved()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    used_after, reserved_after = device_used_bytes(), torch.cuda.memory_reserved()
    return seconds, (used_after - used_before) - (reserved_after - reserved_before)


def peak_extra_bytes(fn) -> int:
    """Peak memory of one call beyond what was allocated before it and beyond its output."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return peak - before - out.numel() * out.element_size()


def time_median_ms(fn, warmup_ms: int, rep_ms: int) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def describe_failure(exc: BaseException, caught) -> str:
    """One line: the exception plus the reasons SDPA gives in its warnings."""
    reasons = dict.fromkeys(str(w.message).strip() for w in caught)  # ordered, deduplicated
    text = " | ".join([f"{type(exc).__name__}: {exc}", *reasons])
    return " ".join(text.split())[:600]


def measure(impl: Impl, inputs, shape: Shape, args) -> dict:
    """Time one implementation at one point; failures become results, never exceptions."""
    if impl.unavailable:
        return {"status": "unavailable", "message": impl.unavailable}
    caught = []
    try:
        with impl.context(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn = impl.make(*inputs, shape.causal)
            first_call_s, outside = first_call(fn)
            extra = peak_extra_bytes(fn)
            ms = time_median_ms(fn, args.warmup, args.rep)
        return {"status": "ok", "ms": ms, "tflops": shape.flops() / (ms * 1e-3) / 1e12,
                "extra_mem_bytes": extra, "outside_torch_mem_bytes": outside,
                "first_call_s": first_call_s}
    except torch.cuda.OutOfMemoryError as exc:
        return {"status": "OOM", "message": describe_failure(exc, [])}
    except Exception as exc:
        return {"status": "error", "message": describe_failure(exc, caught)}
    finally:
        free_memory()


# --------------------------------------------------------------------------- accuracy

def reference_fp64(q, k, v, causal: bool, row0: int):
    """softmax(q k^T / sqrt(D)) v in float64 for query rows row0.. (top-left causal)."""
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:
        rows = torch.arange(row0, row0 + q.shape[-2], device=q.device)[:, None]
        cols = torch.arange(k.shape[-2], device=q.device)[None, :]
        scores.masked_fill_(cols > rows, float("-inf"))
    return torch.softmax(scores, -1) @ v


def max_abs_errors(q, k, v, causal: bool, outputs: dict) -> dict:
    """Max |output - float64 reference| per named output; the reference is built in
    chunks of (batch*head, query rows) so its S x S scores stay under 1 GiB."""
    b, h, s, d = q.shape
    s_k = k.shape[-2]
    flat = {name: t.reshape(b * h, s, d) for name, t in (("q", q), ("k", k), ("v", v))}
    outs = {name: o.reshape(b * h, s, d) for name, o in outputs.items()}
    rows = min(s, max(1, REF_CHUNK_ELEMS // s_k))
    heads = max(1, REF_CHUNK_ELEMS // (rows * s_k))
    errors = dict.fromkeys(outputs, 0.0)
    for h0 in range(0, b * h, heads):
        hs = slice(h0, h0 + heads)
        k64, v64 = flat["k"][hs].double(), flat["v"][hs].double()
        for r0 in range(0, s, rows):
            rs = slice(r0, r0 + rows)
            ref = reference_fp64(flat["q"][hs, rs].double(), k64, v64, causal, r0)
            for name, out in outs.items():
                err = (out[hs, rs].double() - ref).abs().max().item()
                if math.isnan(err) or err > errors[name]:  # a NaN sticks
                    errors[name] = err
            del ref
    return errors


def check_accuracy(tvm_impl: Impl, inputs, shape: Shape) -> dict:
    """Error of tvm_flash and of SDPA (default backend) against float64."""
    q, k, v = inputs
    try:
        outputs = {"tvm_flash": tvm_impl.make(q, k, v, shape.causal)(),
                   "sdpa": make_sdpa(q, k, v, shape.causal)()}
        if outputs["tvm_flash"].shape != q.shape:
            return {"ok": False, "message": f"tvm_flash output shape {tuple(outputs['tvm_flash'].shape)}"}
        errors = max_abs_errors(q, k, v, shape.causal, outputs)
    except Exception as exc:
        return {"ok": False, "message": describe_failure(exc, [])}
    finally:
        outputs = None
        free_memory()
    ours, torchs = errors["tvm_flash"], errors["sdpa"]
    # fp32: the project's absolute bound (torch's own fp32 error can be far below it)
    ok = ours <= FP32_MAX_ERR if q.dtype == torch.float32 else ours <= 2 * torchs
    return {"tvm_flash_max_abs_err": ours, "sdpa_max_abs_err": torchs, "ok": ok}


# --------------------------------------------------------------------------- one point

def cuda_context_broken() -> str | None:
    """After a sticky CUDA error (e.g. an illegal address) every later call fails."""
    try:
        torch.cuda.synchronize()
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def run_point(shape: Shape, dtype_name: str, impls: list[Impl], args, seed: int) -> dict:
    inputs = make_inputs(shape, DTYPES[dtype_name], seed)
    results = {impl.name: measure(impl, inputs, shape, args) for impl in impls}
    tvm_impl = next((i for i in impls if i.name == "tvm_flash"), None)
    tvm_ran = results.get("tvm_flash", {}).get("status") == "ok"
    accuracy = check_accuracy(tvm_impl, inputs, shape) if tvm_ran else None
    del inputs
    free_memory()
    return {"dtype": dtype_name, **asdict(shape), "flops": shape.flops(),
            "results": results, "accuracy": accuracy}


def cell(result: dict) -> str:
    """TFLOP/s, or the failure in a word."""
    if result["status"] == "ok":
        return f"{result['tflops']:.1f}"
    return {"OOM": "OOM", "error": "ERR", "unavailable": "n/a"}[result["status"]]


def accuracy_text(acc: dict | None) -> str:
    if acc is None:
        return "acc n/a"
    if "message" in acc:
        return "acc FAILED"
    verdict = "ok" if acc["ok"] else "BAD"
    return f"err {acc['tvm_flash_max_abs_err']:.1e}/{acc['sdpa_max_abs_err']:.1e} {verdict}"


def point_line(point: dict) -> str:
    shape = Shape(point["batch"], point["heads"], point["seqlen"], point["headdim"], point["causal"])
    speeds = " ".join(f"{SHORT[name]} {cell(r)}" for name, r in point["results"].items())
    line = f"{point['dtype']} {shape.label()} | {speeds} TF/s | {accuracy_text(point['accuracy'])}"
    ours = point["results"].get("tvm_flash", {})
    if ours.get("status") == "ok":
        line += f" | tvm +{ours['extra_mem_bytes'] / MIB:.0f}MiB"
        if ours["first_call_s"] > 1:
            line += f", 1st call {ours['first_call_s']:.1f}s"
    return line


# --------------------------------------------------------------------------- summary

def speed_ratios(points: list[dict], other: str) -> list[float]:
    """tvm_flash TFLOP/s / other's TFLOP/s at every point where both ran."""
    ratios = []
    for p in points:
        ours, theirs = p["results"].get("tvm_flash"), p["results"].get(other)
        if ours and theirs and ours["status"] == theirs["status"] == "ok":
            ratios.append(ours["tflops"] / theirs["tflops"])
    return ratios


def median_or_none(values):
    return statistics.median(values) if values else None


def summarize(points: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for p in points:
        groups.setdefault((p["dtype"], p["heads"], p["headdim"], p["causal"]), []).append(p)
    rows = []
    for (dtype, heads, headdim, causal), members in groups.items():
        ours = [p["results"]["tvm_flash"]["tflops"] for p in members
                if p["results"].get("tvm_flash", {}).get("status") == "ok"]
        vs_fa2 = speed_ratios(members, "sdpa_flash")
        checked = [p["accuracy"] for p in members if p["accuracy"] is not None]
        rows.append({
            "dtype": dtype, "heads": heads, "headdim": headdim, "causal": causal,
            "points": len(members),
            "tvm_tflops_median": median_or_none(ours),
            "vs_sdpa_flash_median": median_or_none(vs_fa2),
            "vs_sdpa_flash_min": min(vs_fa2, default=None),
            "vs_naive_median": median_or_none(speed_ratios(members, "naive")),
            "vs_naive_min": min(speed_ratios(members, "naive"), default=None),
            "vs_naive_eager_min": min(speed_ratios(members, "naive_eager"), default=None),
            "vs_sdpa_cudnn_median": median_or_none(speed_ratios(members, "sdpa_cudnn")),
            "accuracy_ok": f"{sum(bool(a.get('ok')) for a in checked)}/{len(checked)}",
        })
    return rows


SUMMARY_COLUMNS = [  # (header, key, format)
    ("dtype", "dtype", "{}"), ("H", "heads", "{}"), ("D", "headdim", "{}"),
    ("causal", "causal", "{}"), ("pts", "points", "{}"),
    ("tvm TF/s med", "tvm_tflops_median", "{:.1f}"),
    ("/fa2 med", "vs_sdpa_flash_median", "{:.2f}"), ("/fa2 min", "vs_sdpa_flash_min", "{:.2f}"),
    ("/naive med", "vs_naive_median", "{:.2f}"), ("/naive min", "vs_naive_min", "{:.2f}"),
    ("/eager min", "vs_naive_eager_min", "{:.2f}"), ("/cudnn med", "vs_sdpa_cudnn_median", "{:.2f}"),
    ("acc ok", "accuracy_ok", "{}"),
]


def summary_cells(row: dict) -> list[str]:
    cells = []
    for _, key, fmt in SUMMARY_COLUMNS:
        value = row[key]
        if isinstance(value, bool):
            value = "yes" if value else "no"
        cells.append("-" if value is None else fmt.format(value))
    return cells


def format_summary(rows: list[dict]) -> str:
    """Fixed-width summary for stdout."""
    table = [[h for h, _, _ in SUMMARY_COLUMNS]] + [summary_cells(r) for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(SUMMARY_COLUMNS))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in table)


# --------------------------------------------------------------------------- files

def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def markdown_report(meta: dict, points: list[dict], summary: list[dict]) -> str:
    names = list(points[0]["results"]) if points else []
    key = ["dtype", "causal", "B", "H", "S", "D"]

    def key_cells(p):
        return [p["dtype"], "yes" if p["causal"] else "no",
                *(str(p[f]) for f in ("batch", "heads", "seqlen", "headdim"))]

    def speed(r):
        return f"{r['tflops']:.1f} ({r['ms']:.3f})" if r["status"] == "ok" else cell(r)

    def memory(r):
        return f"{r['extra_mem_bytes'] / MIB:.1f}" if r["status"] == "ok" else cell(r)

    def outside(r):
        return f"{r['outside_torch_mem_bytes'] / MIB:.1f}" if r and r["status"] == "ok" else "-"

    def acc_cells(a):
        if a is None or "message" in a:
            return ["-", "-", "n/a" if a is None else "FAILED"]
        return [f"{a['tvm_flash_max_abs_err']:.2e}", f"{a['sdpa_max_abs_err']:.2e}",
                "ok" if a["ok"] else "BAD"]

    lines = [f"# Forward attention benchmark: {meta['device']}", ""]
    lines += [f"- {k}: `{v}`" for k, v in meta.items() if k != "args"]
    lines += ["", "TFLOP/s = 4·B·H·S²·D (halved when causal) / median time. "
              "Ratios are tvm_flash TFLOP/s over the other's (> 1: tvm_flash faster).", "",
              "## Summary (medians over the points of each group)", ""]
    lines += markdown_table([h for h, _, _ in SUMMARY_COLUMNS], [summary_cells(r) for r in summary])
    lines += ["", "## TFLOP/s (median ms)", ""]
    lines += markdown_table(key + names,
                            [key_cells(p) + [speed(p["results"][n]) for n in names] for p in points])
    lines += ["", "## Peak extra memory and max abs error vs float64", "",
              "MiB: torch.cuda.max_memory_allocated() during one call minus inputs (and causal "
              "mask) minus output. Non-torch MiB: device memory the first call left taken outside "
              "torch's allocator (TVM pools, lazily loaded CUDA modules), invisible to the former.",
              ""]
    lines += markdown_table(
        key + [f"{n} MiB" for n in names] + ["tvm_flash non-torch MiB", "err tvm_flash",
                                               "err sdpa", "ok (≤ 2x sdpa; fp32 ≤ 1e-5)"],
        [key_cells(p) + [memory(p["results"][n]) for n in names]
         + [outside(p["results"].get("tvm_flash"))] + acc_cells(p["accuracy"]) for p in points])
    lines += ["", "## Failures", ""] + failure_notes(points) + [""]
    return "\n".join(lines)


def failure_notes(points: list[dict]) -> list[str]:
    """Each distinct failure message once, with the points it hit."""
    seen: dict[tuple, list[str]] = {}
    for p in points:
        where = (f"{p['dtype']} B{p['batch']} H{p['heads']} S{p['seqlen']} D{p['headdim']}"
                 f"{' causal' if p['causal'] else ''}")
        for name, r in p["results"].items():
            if r["status"] != "ok":
                seen.setdefault((name, r["status"], r.get("message", "")), []).append(where)
        if p["accuracy"] and "message" in p["accuracy"]:
            seen.setdefault(("accuracy", "error", p["accuracy"]["message"]), []).append(where)
    if not seen:
        return ["none"]
    return [f"- {name} {status} at {len(w)} point(s) ({', '.join(w[:4])}{', ...' if len(w) > 4 else ''}): {msg}"
            for (name, status, msg), w in seen.items()]


def write_reports(out_dir: Path, stem: str, meta: dict, points: list[dict]) -> list[dict]:
    summary = summarize(points)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "summary": summary, "points": points}
    write_atomic(out_dir / f"{stem}.json", json.dumps(payload, indent=1, default=str) + "\n")
    write_atomic(out_dir / f"{stem}.md", markdown_report(meta, points, summary))
    return summary


def write_atomic(path: Path, text: str) -> None:
    """Write then rename, so a run killed mid-write (a timeout) leaves the previous file whole."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# --------------------------------------------------------------------------- metadata

def card_name() -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", torch.cuda.get_device_name()).strip("_")


def version_of(module_name: str) -> str | None:
    try:
        module = __import__(module_name)
    except Exception:
        return None
    return getattr(module, "__version__", "unknown")


def git_commit() -> str | None:
    """$TVM_FLASH_GIT_COMMIT if set (a copy of the tree whose .git is stale, as on the GPU
    box), else HEAD, marked "-dirty" when tracked files differ from it."""
    if os.environ.get("TVM_FLASH_GIT_COMMIT"):
        return os.environ["TVM_FLASH_GIT_COMMIT"]
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                               cwd=here, timeout=10)
    except Exception:
        return None
    sha = head.stdout.strip()
    return (sha + ("-dirty" if dirty.stdout.strip() else "")) or None


def run_metadata(args, argv: list[str], tvm_error: str | None) -> dict:
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "triton": version_of("triton"), "tvm": version_of("tvm"),
        "tvm_flash": None if tvm_error else version_of("tvm_flash"),
        "tvm_flash_import_error": tvm_error,
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python3", *argv]),
        "warmup_ms": args.warmup, "rep_ms": args.rep,
        "args": vars(args),
    }


# --------------------------------------------------------------------------- main

def parse_impls(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = sorted(set(names) - set(IMPLS) - set(OPTIONAL))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown implementation(s) {unknown}; choose from {','.join(IMPLS)}")
    return names


def parse_seqlens(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected a comma list of positive integers, got {text!r}")
    return values


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", choices=["fa"], default="fa",
                        help="FlashAttention papers' sweep: 16k tokens, hidden 2048 (default)")
    parser.add_argument("--grid", choices=["seed"], default=None,
                        help="use the seed grid (batch x seq x hidden, non-causal) instead of --sweep")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32", "both"], default="both",
                        help="both = bf16 and fp16 (default); fp32 writes <card>[-seed]-fp32.*")
    parser.add_argument("--quick", action="store_true", help="only seq 1024 and 4096")
    parser.add_argument("--seqlens", type=parse_seqlens, default=None,
                        help="comma list of sequence lengths, overrides --quick (e.g. 1024,2048)")
    parser.add_argument("--headdims", type=parse_seqlens, default=None,
                        help="FA sweep head dims, comma list (default 64,128; H = 2048 // D)")
    parser.add_argument("--tag", default=None,
                        help="suffix for the output files: <card>[-seed][-quick][-fp32]-TAG.*")
    parser.add_argument("--impls", type=parse_impls, default=list(IMPLS),
                        help=f"comma list from {','.join(IMPLS)} (default: all)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="directory for <card>.json and <card>.md (default: benchmarks/results)")
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warmup, ms (default 25)")
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms (default 100)")
    return parser.parse_args(argv)


def planned_points(args) -> list[tuple[str, Shape]]:
    default = SEED_SEQLENS if args.grid == "seed" else FA_SEQLENS
    seqlens = args.seqlens or (QUICK_SEQLENS if args.quick else default)
    shapes = seed_grid(seqlens) if args.grid == "seed" else fa_sweep(seqlens, args.headdims or FA_HEADDIMS)
    dtypes = ["bf16", "fp16"] if args.dtype == "both" else [args.dtype]
    return [(dtype, shape) for dtype in dtypes for shape in shapes]


def report_stem(args) -> str:
    """<card>, <card>-quick, <card>-seed, <card>-seed-quick (then -fp32, -TAG when given):
    a quick or fp32 run never overwrites a full one."""
    parts = ([card_name()] + (["seed"] if args.grid == "seed" else [])
             + (["quick"] if args.quick and not args.seqlens else [])
             + (["fp32"] if args.dtype == "fp32" else []) + ([args.tag] if args.tag else []))
    return "-".join(parts)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    tvm_module, tvm_error = (import_tvm_flash() if {"tvm_flash", "tvm_default"} & set(args.impls) else (None, None))
    if tvm_error:
        print(f"WARNING: {tvm_error} -- benchmarking the others", flush=True)
    impls = build_impls(args.impls, tvm_module, tvm_error)
    meta = run_metadata(args, [sys.argv[0], *argv], tvm_error)
    stem = report_stem(args)
    plan = planned_points(args)
    print(f"{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | "
          f"{len(plan)} points | TFLOP/s per impl ({', '.join(f'{SHORT[n]}={n}' for n in args.impls)})",
          flush=True)

    points, summary, start = [], [], time.perf_counter()
    for seed, (dtype_name, shape) in enumerate(plan):
        point = run_point(shape, dtype_name, impls, args, seed)
        points.append(point)
        print(f"{point_line(point)} | t+{time.perf_counter() - start:.0f}s", flush=True)
        summary = write_reports(args.out, stem, meta, points)
        broken = cuda_context_broken()
        if broken:
            print(f"STOPPING: the CUDA context is broken ({broken})", flush=True)
            break

    print(f"\nSummary: ratios are tvm_flash TFLOP/s / other's (>1 = faster), median over seq "
          f"({time.perf_counter() - start:.0f} s)")
    print(format_summary(summary))
    if tvm_error:
        print(f"NOTE: {tvm_error}")
    print(f"wrote {args.out / stem}.json and .md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
