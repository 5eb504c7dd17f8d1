"""BENCHMARKS.md and plots from the result JSONs of bench_forward.py and occupancy.py.

Reads (any may be missing; the section then says so):
    <results>/<card>.json             bench_forward.py --sweep fa      (FlashAttention sweep)
    <results>/<card>-seed.json        bench_forward.py --grid seed     (batch x seq x hidden grid)
    <results>/<card>-fp32.json        bench_forward.py --dtype fp32 ... (fp32 subset)
    <results>/<card>-occupancy.json   occupancy.py                     (Nsight Compute)
Files are recognized by their content (meta.args / meta.kind), so other names work too;
--fa / --seed / --fp32 / --occupancy name files explicitly.

Writes BENCHMARKS.md (default: the repo root) and PNG plots (default: benchmarks/plots/),
linked from the markdown by relative paths. Every number in the markdown is read or
computed here (medians, geometric means, ratios) from the JSON; none is typed by hand.

    python3 benchmarks/report.py
    python3 benchmarks/report.py --results $OUT/benchmarks/results --md $OUT/BENCHMARKS.md \\
        --plots $OUT/benchmarks/plots
Needs only the standard library and matplotlib (no torch, no GPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MIB = 1 << 20

IMPLS = ("tvm_flash", "naive", "naive_eager", "sdpa_flash", "sdpa_cudnn", "sdpa_mem_eff")
OTHERS = IMPLS[1:]
LABEL = {"tvm_flash": "tvm_flash", "naive": "naive", "naive_eager": "naive, fp32 softmax (HF eager)", "sdpa_flash": "SDPA flash (FA2)",
         "sdpa_cudnn": "SDPA cuDNN", "sdpa_mem_eff": "SDPA mem-efficient"}
SHORT = {"tvm_flash": "tvm_flash", "naive": "naive", "naive_eager": "eager", "sdpa_flash": "FA2",
         "sdpa_cudnn": "cuDNN", "sdpa_mem_eff": "mem-eff"}
STYLE = {"tvm_flash": dict(color="#d62728", marker="o", lw=2.4),
         "naive": dict(color="#7f7f7f", marker="x", lw=1.4, ls="--"),
         "naive_eager": dict(color="#bcbd22", marker="+", lw=1.2, ls=":"),
         "sdpa_flash": dict(color="#1f77b4", marker="s", lw=1.6),
         "sdpa_cudnn": dict(color="#2ca02c", marker="^", lw=1.6),
         "sdpa_mem_eff": dict(color="#9467bd", marker="v", lw=1.4)}
ESIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
DTYPE_ORDER = {"bf16": 0, "fp16": 1, "fp32": 2}

# The plan's targets.
TARGET_SPEEDUP = (2.0, 5.0)        # x naive
TARGET_VRAM = (0.70, 0.80)         # reduction vs naive
TARGET_OCCUPANCY = 50.0            # % achieved occupancy

M_ACHIEVED = "sm__warps_active.avg.pct_of_peak_sustained_active"
M_THEORETICAL = "sm__maximum_warps_per_active_cycle_pct"
M_SM = "sm__throughput.avg.pct_of_peak_sustained_elapsed"
M_HMMA = "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active"
M_GMMA = "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active"
M_TENSOR = "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active"
M_REGS = "launch__registers_per_thread"
M_LIM_REGS = "launch__occupancy_limit_registers"
M_LIM_SMEM = "launch__occupancy_limit_shared_mem"
M_LIM_WARPS = "launch__occupancy_limit_warps"
M_BLOCK = "launch__block_size"
M_SMEM_DYN = "launch__shared_mem_per_block_dynamic"
M_TIME = "gpu__time_duration.sum"


# --------------------------------------------------------------------------- loading

def load(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except Exception as exc:
        print(f"skipping {path}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None
    if not isinstance(data, dict) or "meta" not in data or "points" not in data:
        return None
    data["path"] = str(path)
    return data


def kind_of(data: dict) -> str:
    meta = data["meta"]
    if meta.get("kind") in ("occupancy", "backward"):
        return meta["kind"]
    args = meta.get("args") or {}
    if args.get("dtype") == "fp32" or any(p.get("dtype") == "fp32" for p in data["points"]):
        return "fp32"
    return "seed" if args.get("grid") == "seed" else "fa"


def rank(data: dict) -> tuple:
    """Prefer full runs, then more points, then the newest."""
    args = data["meta"].get("args") or {}
    partial = bool(args.get("quick") or args.get("seqlens"))
    return (not partial or kind_of(data) in ("fp32", "occupancy"), len(data["points"]),
            data["meta"].get("date") or "")


def discover(args) -> dict[str, dict]:
    explicit = {k: getattr(args, k) for k in ("fa", "seed", "fp32", "occupancy", "backward")}
    found: dict[str, list[dict]] = {}
    paths = sorted(args.results.glob("*.json")) if args.results.is_dir() else []
    for path in paths:
        if args.card and not path.name.startswith(args.card):
            continue
        data = load(path)
        if data:
            found.setdefault(kind_of(data), []).append(data)
    chosen = {k: max(v, key=rank) for k, v in found.items()}
    if not args.card and "fa" in chosen:  # keep one card: the FA sweep's
        device = chosen["fa"]["meta"].get("device")
        for k, v in found.items():
            same = [d for d in v if d["meta"].get("device") == device]
            if same:
                chosen[k] = max(same, key=rank)
    for k, path in explicit.items():
        if path:
            data = load(path)
            if data:
                chosen[k] = data
            else:
                chosen.pop(k, None)
    return chosen


# --------------------------------------------------------------------------- numbers

def ok(r) -> bool:
    return bool(r) and r.get("status") == "ok"


def res(p, impl):
    return p["results"].get(impl)


def speedup(p, other):
    """tvm_flash over other (their time / our time); None unless both ran."""
    a, b = res(p, "tvm_flash"), res(p, other)
    return a["tflops"] / b["tflops"] if ok(a) and ok(b) else None


def io_bytes(p) -> int:
    """q, k, v and the output: what any implementation must hold."""
    return 4 * p["batch"] * p["heads"] * p["seqlen"] * p["headdim"] * ESIZE.get(p["dtype"], 2)


def vram_reduction(p, total: bool):
    """1 - tvm_flash's memory / naive's: extra memory only, or with inputs + output."""
    a, b = res(p, "tvm_flash"), res(p, "naive")
    if not (ok(a) and ok(b)):
        return None
    base = io_bytes(p) if total else 0
    ours, theirs = base + max(a["extra_mem_bytes"], 0), base + max(b["extra_mem_bytes"], 0)
    return 1 - ours / theirs if theirs > 0 else None


def geomean(xs):
    xs = [x for x in xs if x is not None and x > 0]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def vals(xs):
    return [x for x in xs if x is not None]


def f(x, fmt="{:.2f}", none="-"):
    return none if x is None else fmt.format(x)


def pct(x, digits=1):
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def times(x):
    return "-" if x is None else f"{x:.2f}×"


def cell(r, what="tflops"):
    """A number, or why there is none: OOM, refused (the backend declined the input), ERR, n/a."""
    if r is None:
        return "-"
    if ok(r):
        if what == "tflops":
            return f"{r['tflops']:.1f}"
        if what == "ms":
            return f"{r['ms']:.4f}" if r["ms"] < 1 else f"{r['ms']:.3f}"
        return mib(r["extra_mem_bytes"])
    status = r.get("status")
    if status == "OOM":
        return "OOM"
    if status == "unavailable":
        return "n/a"
    msg = r.get("message") or ""
    if "No available kernel" in msg or "not supported" in msg.lower() or "refus" in msg.lower():
        return "refused"
    return "ERR"


def mib(b):
    if b is None:
        return "-"
    v = b / MIB
    return f"{v:.0f}" if v >= 100 else (f"{v:.1f}" if v >= 0.1 or v == 0 else f"{v:.3f}")


def group_key(p):
    return (DTYPE_ORDER.get(p["dtype"], 9), p["headdim"], p["causal"], p["heads"])


def sorted_points(points):
    return sorted(points, key=lambda p: (*group_key(p), p["seqlen"], p["batch"]))


def groups(points, key=lambda p: (p["dtype"], p["headdim"], p["causal"])):
    out: dict = {}
    for p in sorted_points(points):
        out.setdefault(key(p), []).append(p)
    return out


def spread(xs, fmt=times):
    xs = vals(xs)
    if not xs:
        return "-"
    return f"{fmt(geomean(xs)) if fmt is times else fmt(median(xs))} ({fmt(min(xs))}–{fmt(max(xs))})"


def md_table(header, rows):
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(str(c) for c in r) + " |" for r in rows)]


def yesno(b):
    return "yes" if b else "no"


# --------------------------------------------------------------------------- plots

def plt_module():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"font.size": 8, "axes.titlesize": 9, "legend.fontsize": 8})
    return plt


def save(fig, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    fig.clf()
    try:  # a 256-colour palette: line plots look the same at a third of the bytes
        from PIL import Image
        with Image.open(path) as im:
            small = im.convert("RGB").quantize(colors=256)
        small.save(path, optimize=True)
    except Exception as exc:
        print(f"(kept {path.name} unquantized: {type(exc).__name__}: {exc})", file=sys.stderr)


def seq_axis(ax, seqlens):
    ax.set_xscale("log", base=2)
    ax.set_xticks(seqlens)
    ax.set_xticklabels([f"{s // 1024}k" if s >= 1024 else str(s) for s in seqlens])
    ax.minorticks_off()
    ax.grid(True, alpha=0.3)


def impls_in(points):
    present = {n for p in points for n in p["results"]}
    return [n for n in IMPLS if n in present]


def plot_tflops(points, dtype, card, path: Path, what="Forward"):
    """TFLOP/s vs seq: one panel per (head dim, causal), one line per implementation."""
    plt = plt_module()
    pts = [p for p in points if p["dtype"] == dtype]
    hds = sorted({p["headdim"] for p in pts})
    causals = sorted({p["causal"] for p in pts})
    fig, axes = plt.subplots(len(hds), len(causals), figsize=(4.6 * len(causals), 3.0 * len(hds) + 0.6),
                             squeeze=False)
    top = max((r["tflops"] for p in pts for r in p["results"].values() if ok(r)), default=1.0)
    handles = {}
    for i, d in enumerate(hds):
        for j, c in enumerate(causals):
            ax = axes[i][j]
            sub = sorted((p for p in pts if p["headdim"] == d and p["causal"] == c), key=lambda p: p["seqlen"])
            seqlens = sorted({p["seqlen"] for p in sub})
            for n in impls_in(sub):
                xy = [(p["seqlen"], p["results"][n]["tflops"]) for p in sub if ok(p["results"].get(n))]
                if xy:
                    (line,) = ax.plot(*zip(*xy), label=LABEL[n], ms=4, zorder=5 if n == "tvm_flash" else 2,
                                      **STYLE[n])
                    handles[n] = line
            heads = sorted({p["heads"] for p in sub})
            ax.set_title(f"head dim {d}, {'causal' if c else 'non-causal'} (H={'/'.join(map(str, heads))})")
            seq_axis(ax, seqlens)
            if i == len(hds) - 1:
                ax.set_xlabel("sequence length (batch = 16k tokens / seq)")
            if j == 0:
                ax.set_ylabel(f"TFLOP/s ({what.lower()})")
            ax.set_ylim(0, top * 1.06)
    fig.suptitle(f"{what} attention TFLOP/s, {dtype}, {card}", fontsize=10)
    fig.legend([handles[n] for n in IMPLS if n in handles], [LABEL[n] for n in IMPLS if n in handles],
               loc="lower center", ncol=len(handles), frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    save(fig, path)
    plt.close(fig)


def plot_vram(points, dtype, card, path: Path):
    """Peak extra memory (and total with q, k, v, out) vs seq, log scale, per head dim."""
    plt = plt_module()
    pts = [p for p in points if p["dtype"] == dtype and not p["causal"]] or \
          [p for p in points if p["dtype"] == dtype]
    hds = sorted({p["headdim"] for p in pts})
    floor = 1 / 1024  # MiB: 1 KiB; 0 bytes cannot sit on a log axis
    fig, axes = plt.subplots(2, len(hds), figsize=(4.6 * len(hds), 6.4), squeeze=False)
    handles = {}
    clipped = False
    for j, d in enumerate(hds):
        sub = sorted((p for p in pts if p["headdim"] == d), key=lambda p: p["seqlen"])
        seqlens = sorted({p["seqlen"] for p in sub})
        for i, total in enumerate((False, True)):
            ax = axes[i][j]
            for n in impls_in(sub):
                xy = []
                for p in sub:
                    r = p["results"].get(n)
                    if ok(r):
                        v = (max(r["extra_mem_bytes"], 0) + (io_bytes(p) if total else 0)) / MIB
                        clipped |= v < floor
                        xy.append((p["seqlen"], max(v, floor)))
                if xy:
                    (line,) = ax.plot(*zip(*xy), label=LABEL[n], ms=4, zorder=5 if n == "tvm_flash" else 2,
                                      **STYLE[n])
                    handles[n] = line
                ooms = [p["seqlen"] for p in sub if (p["results"].get(n) or {}).get("status") == "OOM"]
                if ooms and n == "naive":
                    ax.plot(ooms, [ax.get_ylim()[1]] * len(ooms), "x", color="black", ms=8)
            ax.set_yscale("log")
            seq_axis(ax, seqlens)
            ax.set_title(f"head dim {d}: " + ("q, k, v, out + extra" if total else "peak extra memory"))
            ax.set_ylabel("MiB (log)")
            if i == 1:
                ax.set_xlabel("sequence length (batch = 16k tokens / seq)")
    note = " (values under 1 KiB drawn at 1 KiB)" if clipped else ""
    fig.suptitle(f"Peak memory per call, {dtype}, non-causal, {card}{note}", fontsize=10)
    fig.legend([handles[n] for n in IMPLS if n in handles], [LABEL[n] for n in IMPLS if n in handles],
               loc="lower center", ncol=len(handles), frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    save(fig, path)
    plt.close(fig)


def plot_grid(points, dtype, card, path: Path):
    """Seed grid: tvm_flash's speedup over naive and its ratio to FA2, per hidden size."""
    plt = plt_module()
    pts = [p for p in points if p["dtype"] == dtype]
    configs = sorted({(p["heads"] * p["headdim"], p["heads"], p["headdim"]) for p in pts})
    batches = sorted({p["batch"] for p in pts})
    fig, axes = plt.subplots(2, len(configs), figsize=(2.4 * len(configs) + 0.6, 5.2), squeeze=False,
                             sharey="row")
    cmap = plt.get_cmap("viridis")
    handles = {}
    for j, (hidden, h, d) in enumerate(configs):
        sub = [p for p in pts if p["heads"] == h and p["headdim"] == d]
        seqlens = sorted({p["seqlen"] for p in sub})
        for i, other in enumerate(("naive", "sdpa_flash")):
            ax = axes[i][j]
            for k, b in enumerate(batches):
                xy = [(p["seqlen"], speedup(p, other)) for p in sorted(sub, key=lambda p: p["seqlen"])
                      if p["batch"] == b and speedup(p, other) is not None]
                if xy:
                    (line,) = ax.plot(*zip(*xy), marker="o", ms=3,
                                      color=cmap(k / max(1, len(batches) - 1)), label=f"batch {b}")
                    handles[b] = line
            ax.axhline(TARGET_SPEEDUP[0] if other == "naive" else 1.0, color="black", lw=0.8, ls=":")
            seq_axis(ax, seqlens)
            if other == "naive":
                ax.set_yscale("log", base=2)
                ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda y, _: f"{y:g}×"))
                ax.set_title(f"hidden {hidden} ({h}×{d})")
            if j == 0:
                ax.set_ylabel("× naive (log)" if other == "naive" else "÷ SDPA FA2 (>1: faster)")
            if i == 1:
                ax.set_xlabel("sequence length")
    fig.suptitle(f"Seed grid, {dtype}: tvm_flash speed over naive (top) and over SDPA-flash (bottom), {card}",
                 fontsize=9)
    fig.legend([handles[b] for b in batches if b in handles], [f"batch {b}" for b in batches if b in handles],
               loc="lower center", ncol=len(handles), frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 0.94))
    save(fig, path)
    plt.close(fig)


# --------------------------------------------------------------------------- sections

def meta_rows(chosen):
    rows = []
    names = {"fa": "FA sweep", "seed": "seed grid", "fp32": "fp32 subset", "occupancy": "occupancy",
             "backward": "backward FA sweep"}
    for k in ("fa", "seed", "fp32", "backward"):
        if k in chosen:
            m = chosen[k]["meta"]
            rows.append([names[k], f"`{Path(chosen[k]['path']).name}`", m.get("device"), m.get("torch"),
                         m.get("cuda"), m.get("cudnn"), m.get("triton"), m.get("tvm"), m.get("tvm_flash"),
                         m.get("git_commit") or "-", m.get("date"),
                         f"{m.get('warmup_ms')}/{m.get('rep_ms')}", len(chosen[k]["points"])])
    return rows


def section_setup(chosen, lines):
    lines += ["## Setup", ""]
    rows = meta_rows(chosen)
    if rows:
        lines += md_table(["run", "file", "GPU", "torch", "CUDA", "cuDNN", "triton", "TVM", "tvm_flash",
                           "git", "date (UTC)", "warmup/rep ms", "points"], rows)
    if "occupancy" in chosen:
        m = chosen["occupancy"]["meta"]
        lines += ["", f"Occupancy: `{Path(chosen['occupancy']['path']).name}`, {m.get('device')}, "
                      f"Nsight Compute `{m.get('ncu_version')}`, {m.get('date')}."]
    errs = {chosen[k]["meta"].get("tvm_flash_import_error") for k in chosen if k != "occupancy"} - {None}
    for e in errs:
        lines += ["", f"**tvm_flash failed to import in a run:** `{e}`"]
    devices = {chosen[k]["meta"].get("device") for k in chosen} - {None}
    if len(devices) > 1:
        lines += ["", f"**Warning: the result files come from different GPUs: {', '.join(sorted(devices))}.**"]
    lines += ["", "Method (from `bench_forward.py`): median of `triton.testing.do_bench` (CUDA events, "
              "L2 flushed before each call); TFLOP/s = 4·B·H·S²·D / time, halved when causal (the "
              "FlashAttention papers' count); peak extra memory = `torch.cuda.max_memory_allocated()` "
              "during one call minus inputs (and the causal mask) minus the output. Speedups are "
              "tvm_flash's TFLOP/s over the other's (= their time / ours; > 1: tvm_flash faster). "
              "Inputs are random normal, [B, H, S, D], self-attention. Geometric means (geomean) "
              "and medians are over the points named.", ""]


def section_commands(chosen, args, lines):
    lines += ["## Commands", "", "```bash"]
    if args.run_command:
        lines += ["# everything below, in one go:", args.run_command, ""]
    for k in ("fa", "seed", "fp32", "occupancy", "backward"):
        if k in chosen and chosen[k]["meta"].get("command"):
            lines.append(chosen[k]["meta"]["command"])
    lines.append(report_command(args))
    lines += ["```", ""]


def report_command(args) -> str:
    argv = [a for a in sys.argv[1:]]
    return shlex.join(["python3", "benchmarks/report.py", *argv])


def all_perf_points(chosen, kinds=("fa", "seed")):
    out = []
    for k in kinds:
        if k in chosen:
            out += [dict(p, source=k) for p in chosen[k]["points"]]
    return out


def occ_points(chosen, impl):
    if "occupancy" not in chosen:
        return []
    return [p for p in chosen["occupancy"]["points"] if p["impl"] == impl and p["status"] == "ok"]


def metric(p, name):
    m = (p.get("metrics") or {}).get(name)
    return None if m is None else m.get("value")


def section_targets(chosen, lines):
    lines += ["## Targets of the plan: met or not", ""]
    pts = all_perf_points(chosen)
    half = [p for p in pts if p["dtype"] in ("bf16", "fp16")]
    rows = []

    # 1. speed vs naive
    s = [speedup(p, "naive") for p in half]
    sv = vals(s)
    naive_oom = sum(1 for p in half if (res(p, "naive") or {}).get("status") == "OOM" and ok(res(p, "tvm_flash")))
    if sv:
        below = sum(1 for x in sv if x < TARGET_SPEEDUP[0])
        verdict = ("**met**" if below == 0 else
                   f"**met at {len(sv) - below}/{len(sv)} points**" if below < len(sv) else "**not met**")
        if below == 0 and min(sv) > TARGET_SPEEDUP[1]:
            verdict += " (above the range at every point)"
        detail = (f"geomean {times(geomean(sv))}, median {times(median(sv))}, min {times(min(sv))}, "
                  f"max {times(max(sv))} over {len(sv)} fp16/bf16 points ({by_source(half, lambda p: speedup(p, 'naive'))})")
        if naive_oom:
            detail += f"; naive ran out of memory at {naive_oom} more point(s) where tvm_flash ran"
        if below:
            worst = min((p for p in half if speedup(p, "naive") is not None), key=lambda p: speedup(p, "naive"))
            detail += f"; lowest at {where(worst)}"
        rows.append(["speedup vs naive", f"{TARGET_SPEEDUP[0]:g}–{TARGET_SPEEDUP[1]:g}×", detail, verdict])
    else:
        rows.append(["speedup vs naive", f"{TARGET_SPEEDUP[0]:g}–{TARGET_SPEEDUP[1]:g}×", "no data", "not measured"])

    # 2. VRAM vs naive
    tot = vals(vram_reduction(p, True) for p in half)
    ext = vals(vram_reduction(p, False) for p in half)
    if tot:
        below = sum(1 for x in tot if x < TARGET_VRAM[0])
        verdict = ("**met**" if below == 0 else
                   f"**met at {len(tot) - below}/{len(tot)} points**" if below < len(tot) else "**not met**")
        detail = (f"peak memory of a call including q, k, v and output: reduction median {pct(median(tot))}, "
                  f"min {pct(min(tot))}, max {pct(max(tot))} over {len(tot)} points; the extra (workspace) "
                  f"memory alone: median {pct(median(ext), 2)}, min {pct(min(ext), 2)}")
        if below:
            worst = min((p for p in half if vram_reduction(p, True) is not None), key=lambda p: vram_reduction(p, True))
            detail += f"; lowest at {where(worst)}"
        if naive_oom:
            detail += f"; plus {naive_oom} point(s) where naive ran out of memory"
        outside = vals((res(p, "tvm_flash") or {}).get("outside_torch_mem_bytes") for p in half if ok(res(p, "tvm_flash")))
        if outside:
            detail += f"; tvm_flash memory outside torch's allocator: max {mib(max(outside))} MiB"
        rows.append(["VRAM reduction vs naive", f"{pct(TARGET_VRAM[0], 0)}–{pct(TARGET_VRAM[1], 0)}", detail, verdict])
    else:
        rows.append(["VRAM reduction vs naive", f"{pct(TARGET_VRAM[0], 0)}–{pct(TARGET_VRAM[1], 0)}", "no data",
                     "not measured"])

    # 3. occupancy
    ours = occ_points(chosen, "tvm_flash")
    if ours:
        ach = vals(metric(p, M_ACHIEVED) for p in ours)
        theo = vals(metric(p, M_THEORETICAL) for p in ours)
        regs = vals(metric(p, M_REGS) for p in ours)
        lim = vals(metric(p, M_LIM_REGS) for p in ours)
        hm = vals(metric(p, M_HMMA) for p in ours)
        fa2 = occ_points(chosen, "sdpa_flash")
        fa2_ach = vals(metric(p, M_ACHIEVED) for p in fa2)
        fa2_hm = vals(metric(p, M_HMMA) for p in fa2)
        met = bool(ach) and median(ach) > TARGET_OCCUPANCY
        detail = (f"tvm_flash achieved occupancy {rng(ach, '%')} (theoretical {rng(theo, '%')}) over "
                  f"{len(ours)} profiled points; {rng(regs, '')} registers/thread, register limit "
                  f"{rng(lim, '')} blocks/SM")
        reg_bound = all(metric(p, M_LIM_REGS) is not None
                        and all(metric(p, m) is None or metric(p, M_LIM_REGS) <= metric(p, m)
                                for m in (M_LIM_SMEM, M_LIM_WARPS)) for p in ours)
        by_design = bool(not met and theo and max(theo) <= TARGET_OCCUPANCY and regs and min(regs) >= 128
                         and reg_bound)
        if by_design:
            detail += (". Low by design: large register tiles (the output accumulator and P stay in "
                       "registers), so the register file caps the blocks per SM (the register limit is "
                       "the lowest of the occupancy limits)")
            fa2_theo = vals(metric(p, M_THEORETICAL) for p in fa2)
            if fa2_theo:
                detail += f"; SDPA-flash's theoretical occupancy is {rng(fa2_theo, '%')}"
        if hm:
            detail += f". Tensor-pipe utilization instead (ncu's HMMA-pipe metric; whether it counts Hopper wgmma as it counts mma.sync is not established): tvm_flash {rng(hm, '%')}"
            if fa2_hm:
                detail += f", SDPA-flash {rng(fa2_hm, '%')}"
        if fa2_ach:
            detail += f"; SDPA-flash achieved occupancy {rng(fa2_ach, '%')}"
        verdict = "**met**" if met else ("**not met (by design)**" if by_design else "**not met**")
        rows.append(["occupancy", f"> {TARGET_OCCUPANCY:g}%", detail, verdict])
    else:
        why = "no occupancy file" if "occupancy" not in chosen else "no tvm_flash kernel profiled (see Occupancy)"
        rows.append(["occupancy", f"> {TARGET_OCCUPANCY:g}%", why, "not measured"])

    # 4./5. ratios to SDPA-flash and cuDNN (no numeric target in the plan: reported)
    for other in ("sdpa_flash", "sdpa_cudnn"):
        r = [speedup(p, other) for p in half]
        if vals(r):
            parts = []
            for (dt, d), mem in groups(half, key=lambda p: (p["dtype"], p["headdim"])).items():
                g = vals(speedup(p, other) for p in mem)
                if g:
                    parts.append(f"{dt} hd{d} {times(geomean(g))}")
            detail = (f"tvm_flash ÷ {LABEL[other]}: geomean {times(geomean(vals(r)))} "
                      f"(min {times(min(vals(r)))}, max {times(max(vals(r)))}) over {len(vals(r))} points; "
                      + ", ".join(parts))
            wins = sum(1 for x in vals(r) if x >= 1)
            rows.append([f"ratio to {LABEL[other]}", "reported (> 1: tvm_flash faster)", detail,
                         f"faster at {wins}/{len(vals(r))} points"])
    lines += md_table(["target", "goal", "measured", "verdict"], rows)
    lines += [""]


def rng(xs, unit):
    xs = vals(xs)
    if not xs:
        return "-"
    lo, hi = min(xs), max(xs)
    fmt = "{:.0f}" if unit == "" else "{:.1f}"
    return (fmt.format(lo) if lo == hi else f"{fmt.format(lo)}–{fmt.format(hi)}") + unit


SOURCE = {"fa": "FA sweep", "seed": "grid", "fp32": "fp32 subset", "backward": "backward sweep"}


def where(p, source=True):
    text = (f"{p['dtype']} B{p['batch']} H{p['heads']} S{p['seqlen']} D{p['headdim']}"
            f"{' causal' if p['causal'] else ''}")
    return f"{text} ({SOURCE.get(p.get('source'), p.get('source'))})" if source and p.get("source") else text


def by_source(points, fn):
    parts = []
    for src, name in (("fa", "FA sweep"), ("seed", "grid")):
        xs = vals(fn(p) for p in points if p.get("source") == src)
        if xs:
            parts.append(f"{name} geomean {times(geomean(xs))}")
    return ", ".join(parts)


def section_group_summary(chosen, lines):
    pts = all_perf_points(chosen, ("fa", "seed", "fp32"))
    if not pts:
        return
    lines += ["### Per group", "",
              "Geometric mean over the points of each group (min–max in brackets) of tvm_flash's speed "
              "relative to each implementation, and the median of tvm_flash's TFLOP/s.", ""]
    rows = []
    for src, name in (("fa", "FA sweep"), ("seed", "grid"), ("fp32", "fp32")):
        for (dt, d, c), mem in groups([p for p in pts if p["source"] == src]).items():
            tf = vals(res(p, "tvm_flash")["tflops"] for p in mem if ok(res(p, "tvm_flash")))
            rows.append([name, dt, d, yesno(c), len(mem), f(median(tf), "{:.1f}"),
                         *(spread([speedup(p, o) for p in mem]) for o in OTHERS)])
    lines += md_table(["run", "dtype", "D", "causal", "points", "tvm_flash TF/s (median)",
                       *(f"× {SHORT[o]}" for o in OTHERS)], rows)
    lines += [""]


def section_fa(chosen, plots, md_dir, lines):
    lines += ["## FlashAttention sweep", ""]
    if "fa" not in chosen:
        lines += ["Not run (no FA sweep result file).", ""]
        return
    pts = chosen["fa"]["points"]
    lines += ["16k tokens per batch (B = 16384 / S), hidden 2048 (H = 2048 / D), as in the "
              "FlashAttention papers. TFLOP/s per implementation; × columns: tvm_flash's speed "
              "over the other's.", ""]
    for dt in sorted({p["dtype"] for p in pts}, key=lambda d: DTYPE_ORDER.get(d, 9)):
        if dt in plots:
            lines += [f"![TFLOP/s vs sequence length, {dt}]({rel(plots[dt], md_dir)})", ""]
    lines += perf_table(pts)
    lines += [""]


def perf_table(pts):
    names = [n for n in IMPLS if any(n in p["results"] for p in pts)]
    others = [n for n in names if n != "tvm_flash"]
    rows = []
    for p in sorted_points(pts):
        rows.append([p["dtype"], p["headdim"], yesno(p["causal"]), p["seqlen"], p["batch"], p["heads"],
                     *(cell(p["results"].get(n)) for n in names),
                     *(times(speedup(p, o)) for o in others), acc(p)])
    return md_table(["dtype", "D", "causal", "S", "B", "H", *(f"{SHORT[n]} TF/s" for n in names),
                     *(f"× {SHORT[o]}" for o in others), "accuracy"], rows)


def acc(p):
    a = p.get("accuracy")
    if not a:
        return "-"
    if "message" in a:
        return "failed"
    return "ok" if a.get("ok") else "BAD"


def section_grid(chosen, plots, md_dir, lines):
    lines += ["## Seed grid", ""]
    if "seed" not in chosen:
        lines += ["Not run (no seed grid result file).", ""]
        return
    pts = chosen["seed"]["points"]
    lines += ["Batch × sequence length × hidden size (heads × head dim), non-causal. tvm_flash's "
              "time and TFLOP/s, its speed over each other implementation (×), its peak extra "
              "memory and naive's, and the memory reduction vs naive (extra memory alone, and "
              "total with q, k, v and the output).", ""]
    for dt in sorted({p["dtype"] for p in pts}, key=lambda d: DTYPE_ORDER.get(d, 9)):
        if dt in plots:
            lines += [f"![seed grid speedups, {dt}]({rel(plots[dt], md_dir)})", ""]
    names = [n for n in OTHERS if any(n in p["results"] for p in pts)]
    for dt in sorted({p["dtype"] for p in pts}, key=lambda d: DTYPE_ORDER.get(d, 9)):
        sub = sorted((p for p in pts if p["dtype"] == dt),
                     key=lambda p: (p["heads"] * p["headdim"], p["headdim"], p["batch"], p["seqlen"]))
        rows = []
        for p in sub:
            t = res(p, "tvm_flash")
            rows.append([f"{p['heads'] * p['headdim']} ({p['heads']}×{p['headdim']})", p["batch"], p["seqlen"],
                         cell(t, "ms"), cell(t), *(times(speedup(p, o)) if speedup(p, o) else cell(res(p, o))
                                                   for o in names),
                         cell(t, "mem"), cell(res(p, "naive"), "mem"),
                         pct(vram_reduction(p, False), 2), pct(vram_reduction(p, True)), acc(p)])
        lines += [f"<details><summary>{dt}: {len(sub)} points</summary>", ""]
        lines += md_table(["hidden (H×D)", "B", "S", "tvm_flash ms", "TF/s", *(f"× {SHORT[o]}" for o in names),
                           "tvm_flash MiB", "naive MiB", "reduction (extra)", "reduction (total)", "accuracy"],
                          rows)
        lines += ["", "</details>", ""]


def section_vram(chosen, plots, md_dir, lines):
    lines += ["## Peak extra VRAM (FlashAttention sweep)", ""]
    if "fa" not in chosen:
        lines += ["Not run (no FA sweep result file).", ""]
        return
    pts = chosen["fa"]["points"]
    for dt, path in plots.items():
        lines += [f"![peak memory vs sequence length, {dt}]({rel(path, md_dir)})", ""]
    names = [n for n in IMPLS if any(n in p["results"] for p in pts)]
    lines += ["MiB per call beyond inputs and output (see Setup); `OOM`: out of memory. "
              "q, k, v + out: the memory every implementation needs. Reduction: 1 − tvm_flash / naive.", ""]
    rows = []
    for p in sorted_points(pts):
        t = res(p, "tvm_flash")
        rows.append([p["dtype"], p["headdim"], yesno(p["causal"]), p["seqlen"], p["batch"],
                     *(cell(p["results"].get(n), "mem") for n in names),
                     mib(t.get("outside_torch_mem_bytes")) if ok(t) else "-", mib(io_bytes(p)),
                     pct(vram_reduction(p, False), 2), pct(vram_reduction(p, True))])
    lines += md_table(["dtype", "D", "causal", "S", "B", *(f"{SHORT[n]} MiB" for n in names),
                       "tvm_flash non-torch MiB", "q,k,v,out MiB", "reduction (extra)", "reduction (total)"], rows)
    lines += [""]


def section_fp32(chosen, plots, md_dir, lines):
    lines += ["## fp32 (subset)", ""]
    if "fp32" not in chosen:
        lines += ["Not run (no fp32 result file).", ""]
        return
    pts = chosen["fp32"]["points"]
    lines += ["tvm_flash's fp32 path is the FFMA kernel (no tensor cores). SDPA's flash and cuDNN "
              "backends refuse fp32 (`refused`). naive uses torch's fp32 matmul (TF32 as torch's "
              "default setting decides).", ""]
    if "fp32" in plots:
        lines += [f"![TFLOP/s, fp32]({rel(plots['fp32'], md_dir)})", ""]
    lines += perf_table(pts)
    msgs = {}
    for p in pts:
        for n, r in p["results"].items():
            if r.get("status") not in ("ok", None):
                msgs.setdefault((n, cell(r)), r.get("message", ""))
    if msgs:
        lines += [""] + [f"- {LABEL.get(n, n)} {c}: `{m[:300]}`" for (n, c), m in msgs.items()]
    lines += [""]


OCC_COLUMNS = [("achieved occupancy %", M_ACHIEVED, "{:.1f}"), ("theoretical occupancy %", M_THEORETICAL, "{:.1f}"),
               ("regs/thread", M_REGS, "{:.0f}"), ("blocks/SM by regs", M_LIM_REGS, "{:.0f}"),
               ("by smem", M_LIM_SMEM, "{:.0f}"), ("block size", M_BLOCK, "{:.0f}"),
               ("SM throughput %", M_SM, "{:.1f}"), ("tensor pipe HMMA %", M_HMMA, "{:.1f}"),
               ("tensor pipe GMMA %", M_GMMA, "{:.1f}"), ("any tensor pipe %", M_TENSOR, "{:.1f}")]


def section_backward(chosen, plots, md_dir, lines):
    lines += ["## Backward (FlashAttention sweep)", ""]
    if "backward" not in chosen:
        lines += ["Not run (no backward result file: `benchmarks/bench_backward.py --sweep fa --out ...`).", ""]
        return
    data = chosen["backward"]
    pts = data["points"]
    per_grad = any("tvm_flash_errs_dq_dk_dv" in (p.get("accuracy") or {}) for p in pts)
    checked = ("of dQ, dK and dV each, on the first and the last (batch, head)" if per_grad
               else "over dQ, dK and dV together, on batch 0, head 0")
    lines += ["dQ, dK, dV: `out.backward(dout)` timed with the forward outside the timed region (median of "
              "`do_bench`), TFLOP/s with the FlashAttention papers' count, 2.5 × the forward's "
              "4·B·H·S²·D (halved when causal). Same shapes as the forward sweep. Accuracy: max abs "
              f"error against float64 {checked} (ok: tvm_flash ≤ 2× SDPA's "
              f"default backend in the same dtype). File `{Path(data['path']).name}`, "
              f"{data['meta'].get('device')}, git {data['meta'].get('git_commit')}, {data['meta'].get('date')}.", ""]
    rows = []
    for (dt, d, c), mem in groups(pts).items():
        tf = vals(res(p, "tvm_flash")["tflops"] for p in mem if ok(res(p, "tvm_flash")))
        rows.append([dt, d, yesno(c), len(mem), f(median(tf), "{:.1f}"),
                     *(spread([speedup(p, o) for p in mem]) for o in ("sdpa_flash", "sdpa_cudnn")),
                     f"{sum(bool(p.get('accuracy') and p['accuracy'].get('ok')) for p in mem)}/{len(mem)}"])
    lines += md_table(["dtype", "D", "causal", "points", "tvm_flash TF/s (median)", "× FA2 geomean (min–max)",
                       "× cuDNN geomean (min–max)", "accuracy ok"], rows)
    lines += [""]
    for dt in sorted({p["dtype"] for p in pts}, key=lambda d: DTYPE_ORDER.get(d, 9)):
        if dt in plots:
            lines += [f"![Backward TFLOP/s vs sequence length, {dt}]({rel(plots[dt], md_dir)})", ""]
    lines += perf_table(pts)
    lines += [""]


def section_occupancy(chosen, lines):
    lines += ["## Occupancy (Nsight Compute)", ""]
    if "occupancy" not in chosen:
        lines += ["Not run (no occupancy result file).", ""]
        return
    data = chosen["occupancy"]
    meta = data["meta"]
    lines += [f"One profiled call per point after warm-up, `ncu --clock-control none`, kernel filter "
              f"per implementation ({', '.join(f'{k}: `{v}`' for k, v in (meta.get('filters') or {}).items())}). "
              "Achieved occupancy = `sm__warps_active` (% of the SM's warp slots, while active); "
              "theoretical = `sm__maximum_warps_per_active_cycle_pct`; tensor pipe = share of active "
              "cycles the tensor pipe was busy, HMMA for `mma.sync` (tvm_flash, FA2), GMMA for "
              "Hopper's `wgmma` (cuDNN).", ""]
    if meta.get("error"):
        lines += [f"**Not measured:** {meta['error']}", ""]
    if meta.get("probe_error"):
        lines += [f"Probe kernel failed: `{meta['probe_error']}`", ""]
    pts = data["points"]
    present = [c for c in OCC_COLUMNS if any(metric(p, c[1]) is not None for p in pts)]
    rows = []
    for p in pts:
        shape = f"{p['dtype']} B{p['batch']} H{p['heads']} S{p['seqlen']} D{p['headdim']}{' causal' if p['causal'] else ''}"
        if p["status"] == "ok":
            t = metric(p, M_TIME)
            unit = ((p.get("metrics") or {}).get(M_TIME) or {}).get("unit", "")
            rows.append([LABEL.get(p["impl"], p["impl"]), shape,
                         *(f(metric(p, m), fm) for _, m, fm in present), duration_us(t, unit),
                         f"`{short_kernel(p.get('kernel_name'))}`"])
        else:
            rows.append([LABEL.get(p["impl"], p["impl"]), shape, *(["-"] * len(present)), "-",
                         f"{p['status']}: {(p.get('message') or '')[:160]}"])
    lines += md_table(["implementation", "point", *(c[0] for c in present), "kernel µs (profiled)", "kernel"],
                      rows)
    failed = meta.get("metrics_failed") or {}
    if failed:
        lines += ["", "Metrics that ncu rejected or gave no value for (on the probe kernel):", ""]
        lines += [f"- `{m}`: {why}" for m, why in failed.items()]
    lines += [""]


def duration_us(v, unit):
    if v is None:
        return "-"
    scale = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1, "us": 1, "msecond": 1e3, "ms": 1e3,
             "second": 1e6, "s": 1e6}.get(unit.strip().lower())
    return "-" if scale is None else f"{v * scale:.0f}"


def short_kernel(name):
    if not name:
        return "-"
    name = name.split("(")[0]
    return name if len(name) <= 60 else name[:57] + "..."


def section_failures(chosen, lines):
    seen: dict = {}
    for k in ("fa", "seed", "fp32", "backward"):
        for p in chosen.get(k, {}).get("points", []):
            for n, r in p["results"].items():
                if not ok(r):
                    key = (n, cell(r), (r.get("message") or "")[:300])
                    seen.setdefault(key, []).append(f"{SOURCE[k]} {where(p, False)}")
            a = p.get("accuracy")
            if a and "message" in a:
                seen.setdefault(("accuracy", "failed", a["message"][:300]), []).append(f"{SOURCE[k]} {where(p, False)}")
    lines += ["## Failures", ""]
    if not seen:
        lines += ["None in the benchmark runs.", ""]
        return
    for (n, status, msg), where_ in seen.items():
        more = f", … ({len(where_)} in all)" if len(where_) > 3 else ""
        lines.append(f"- {LABEL.get(n, n)} {status} at {', '.join(where_[:3])}{more}: `{msg}`")
    lines += [""]


def rel(path: Path, md_dir: Path) -> str:
    return Path(os.path.relpath(path, md_dir)).as_posix()


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=HERE / "results",
                        help="directory of result JSONs (default: benchmarks/results)")
    parser.add_argument("--fa", type=Path, help="FA sweep JSON (default: found in --results)")
    parser.add_argument("--seed", type=Path, help="seed grid JSON")
    parser.add_argument("--fp32", type=Path, help="fp32 subset JSON")
    parser.add_argument("--occupancy", type=Path, help="occupancy JSON")
    parser.add_argument("--backward", type=Path, help="backward sweep JSON (bench_backward.py --sweep fa)")
    parser.add_argument("--card", help="only files whose name starts with this (default: the FA sweep's GPU)")
    parser.add_argument("--md", type=Path, default=REPO / "BENCHMARKS.md", help="markdown output (default: repo root)")
    parser.add_argument("--plots", type=Path, default=HERE / "plots", help="PNG directory (default: benchmarks/plots)")
    parser.add_argument("--run-command", default=None, help="the command that produced everything, for the record")
    parser.add_argument("--note", action="append", default=[], help="a paragraph for the Setup section (repeatable)")
    args = parser.parse_args(argv)

    chosen = discover(args)
    if not chosen:
        print(f"no result files found in {args.results}", file=sys.stderr)
    for k, d in chosen.items():
        print(f"{k:10s} {d['path']} ({len(d['points'])} points)")
    card = next((chosen[k]["meta"].get("device") for k in ("fa", "seed", "fp32", "occupancy", "backward")
                 if k in chosen and chosen[k]["meta"].get("device")), "unknown GPU")
    stem = card.replace(" ", "_")
    md_dir = args.md.resolve().parent
    plots_tf, plots_vram, plots_grid, plots_fp32, plots_bwd = {}, {}, {}, {}, {}
    try:
        if "fa" in chosen:
            pts = chosen["fa"]["points"]
            dts = sorted({p["dtype"] for p in pts}, key=lambda d: DTYPE_ORDER.get(d, 9))
            for dt in dts:
                plots_tf[dt] = args.plots.resolve() / f"{stem}-fa-tflops-{dt}.png"
                plot_tflops(pts, dt, card, plots_tf[dt])
            vdt = dts[0] if dts else None
            if vdt:
                plots_vram[vdt] = args.plots.resolve() / f"{stem}-fa-vram-{vdt}.png"
                plot_vram(pts, vdt, card, plots_vram[vdt])
        if "seed" in chosen:
            pts = chosen["seed"]["points"]
            for dt in sorted({p["dtype"] for p in pts}, key=lambda d: DTYPE_ORDER.get(d, 9)):
                plots_grid[dt] = args.plots.resolve() / f"{stem}-grid-{dt}.png"
                plot_grid(pts, dt, card, plots_grid[dt])
        if "fp32" in chosen and len({p["seqlen"] for p in chosen["fp32"]["points"]}) > 1:
            card32 = chosen["fp32"]["meta"].get("device") or card  # the fp32 run may come from another card
            plots_fp32["fp32"] = args.plots.resolve() / f"{card32.replace(' ', '_')}-fp32-tflops.png"
            plot_tflops(chosen["fp32"]["points"], "fp32", card32, plots_fp32["fp32"])
        if "backward" in chosen:
            pts = chosen["backward"]["points"]
            for dt in sorted({p["dtype"] for p in pts}, key=lambda d: DTYPE_ORDER.get(d, 9)):
                plots_bwd[dt] = args.plots.resolve() / f"{stem}-bwd-tflops-{dt}.png"
                plot_tflops(pts, dt, card, plots_bwd[dt], what="Backward")
    except ImportError as exc:  # no matplotlib: the markdown still gets written
        print(f"no plots: {exc}", file=sys.stderr)
        plots_tf, plots_vram, plots_grid, plots_fp32, plots_bwd = {}, {}, {}, {}, {}

    lines = [f"# tvm_flash benchmarks: {card}", "",
             "Forward attention (and, in its own section, the backward), tvm_flash against naive PyTorch "
             "attention and SDPA's backends. "
             "Generated by `benchmarks/report.py` from the result files named under Setup; every "
             "number below is read or computed from them.", ""]
    section_targets(chosen, lines)
    section_group_summary(chosen, lines)
    section_setup(chosen, lines)
    lines += [*(f"**Note:** {n}\n" for n in args.note)]
    section_commands(chosen, args, lines)
    section_fa(chosen, plots_tf, md_dir, lines)
    section_vram(chosen, plots_vram, md_dir, lines)
    section_grid(chosen, plots_grid, md_dir, lines)
    section_fp32(chosen, plots_fp32, md_dir, lines)
    section_backward(chosen, plots_bwd, md_dir, lines)
    section_occupancy(chosen, lines)
    section_failures(chosen, lines)
    args.md.parent.mkdir(parents=True, exist_ok=True)
    args.md.write_text("\n".join(lines))
    print(f"wrote {args.md}" + "".join(f", {p}" for d in (plots_tf, plots_vram, plots_grid, plots_fp32, plots_bwd)
                                       for p in d.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
