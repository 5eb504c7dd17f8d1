"""Occupancy and pipe utilization of the attention kernels, measured with Nsight Compute.

For a few representative points (bf16, 16k tokens, hidden 2048: head dim 64 and 128,
seq 4096, causal and not) it profiles tvm_flash's kernel (`flash_fwd_kernel`), SDPA's
flash backend (FA2, `pytorch_flash::flash_fwd_kernel<...>`) and SDPA's cuDNN backend,
each kernel once, after warm-up:

    ncu --clock-control none --profile-from-start off -k regex:<filter> --metrics <list> --csv \\
        python3 benchmarks/occupancy.py --child --impl <impl> --points <...>

The child (this file with --child) runs one implementation only. For each point it
makes the inputs, calls the implementation a few times (warm-up, kernel build or load),
then calls it once more between cudaProfilerStart and cudaProfilerStop, so ncu sees one
call per point and the `-k` filter keeps that call's attention kernel. One ncu process
covers all points of one implementation; when its CSV does not hold exactly one kernel
per point (or the child died), each point is profiled again in its own ncu process with
`--launch-count 1`. A point that still fails is recorded with ncu's message and the run
goes on.

Metric names are checked first on a tiny probe kernel: a metric that ncu rejects is
dropped (and listed under meta.metrics_failed) and the probe repeats, so one bad name
never costs the real points.

Output: <out>/<card>-occupancy.json (default benchmarks/results), rewritten after every
implementation. Budget: --budget seconds in all (default 170); points not reached in time
are recorded as skipped.

Run on the GPU machine (TVM and the package on PYTHONPATH, ncu on PATH):
    python3 benchmarks/occupancy.py
    python3 benchmarks/occupancy.py --impls tvm_flash,sdpa_flash --out /tmp/res
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# The metrics the issue asks for; all valid names for ncu 2023+ on Hopper as far as we know.
# Any that ncu rejects is dropped by the probe and recorded.
METRICS = [
    "sm__warps_active.avg.pct_of_peak_sustained_active",                  # achieved occupancy
    "sm__maximum_warps_per_active_cycle_pct",                             # theoretical occupancy
    "sm__throughput.avg.pct_of_peak_sustained_elapsed",                   # SM speed of light
    "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active",  # mma.sync tensor pipe
    "launch__registers_per_thread",
    "launch__occupancy_limit_registers",                                  # blocks/SM allowed by registers
]
# Extra context; cheap (launch__* are launch attributes, no replay).
EXTRA_METRICS = [
    "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active",  # wgmma (cuDNN, FA3)
    "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active",     # any tensor op
    "launch__occupancy_limit_shared_mem",
    "launch__occupancy_limit_warps",
    "launch__occupancy_limit_blocks",
    "launch__shared_mem_per_block_dynamic",
    "launch__shared_mem_per_block_static",
    "launch__block_size",
    "launch__grid_size",
    "launch__waves_per_multiprocessor",
    "gpu__time_duration.sum",
]
# ncu's kernel-name filter per implementation (matched against the function name).
FILTERS = {
    "tvm_flash": "regex:flash_fwd",
    "sdpa_flash": "regex:flash_fwd",
    "sdpa_cudnn": "regex:sdpa|fmha|fprop|attn|flash|cudnn",
}
IMPLS = tuple(FILTERS)
DTYPES = ("bf16", "fp16")
# (batch, heads, seqlen, headdim, causal): 16k tokens, hidden 2048, as in the FA sweep.
DEFAULT_POINTS = [(4, 32, 4096, 64, False), (4, 32, 4096, 64, True),
                  (4, 16, 4096, 128, False), (4, 16, 4096, 128, True)]
WARMUP_CALLS = 3
PROBE_TRIES = 5
NCU_ERROR_RE = re.compile(r"==(?:ERROR|WARNING)==.*")


# --------------------------------------------------------------------------- child (runs under ncu)

def point_label(p) -> str:
    b, h, s, d, c = p
    return f"B{b} H{h} S{s} D{d}{' causal' if c else ''}"


def parse_point(text: str):
    """'4x32x4096x64[c]' -> (4, 32, 4096, 64, causal)."""
    causal = text.endswith("c")
    b, h, s, d = (int(v) for v in text.rstrip("c").split("x"))
    return (b, h, s, d, causal)


def point_arg(p) -> str:
    b, h, s, d, c = p
    return f"{b}x{h}x{s}x{d}{'c' if c else ''}"


def child_main(args) -> int:
    """Run one implementation at each point; one profiled call per point."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    print(f"DEVICE {torch.cuda.get_device_name()}", flush=True)
    if args.impl == "probe":  # one tiny kernel inside the profiled range
        x = torch.ones(1024, device="cuda")
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        x.mul_(2)
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        print("PROFILED probe", flush=True)
        return 0

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if args.impl == "tvm_flash":
        import tvm_flash

        def call(q, k, v, causal):
            return tvm_flash.attention(q, k, v, causal=causal)
        context = None
    else:
        backend = {"sdpa_flash": SDPBackend.FLASH_ATTENTION,
                   "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}[args.impl]

        def call(q, k, v, causal):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        context = backend

    status = 0
    for text in args.points.split(","):
        b, h, s, d, causal = parse_point(text)
        try:
            gen = torch.Generator(device="cuda").manual_seed(0)
            q, k, v = (torch.randn((b, h, s, d), dtype=dtype, device="cuda", generator=gen)
                       for _ in range(3))
            with (sdpa_kernel(context) if context is not None else _null()):
                for _ in range(WARMUP_CALLS):
                    call(q, k, v, causal)
                torch.cuda.synchronize()
                torch.cuda.profiler.start()
                call(q, k, v, causal)
                torch.cuda.synchronize()
                torch.cuda.profiler.stop()
            print(f"PROFILED {text}", flush=True)
        except Exception as exc:  # the parent records it; the other points go on
            msg = " ".join(f"{type(exc).__name__}: {exc}".split())[:400]
            print(f"FAILED {text} {msg}", flush=True)
            status = 3
            try:
                torch.cuda.synchronize()
            except Exception:
                return 4  # sticky CUDA error: nothing more can run in this process
        finally:
            q = k = v = None
            torch.cuda.empty_cache()
    return status


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------- ncu driving (parent)

def ncu_version(ncu: str) -> str | None:
    try:
        out = subprocess.run([ncu, "--version"], capture_output=True, text=True, timeout=30)
    except Exception as exc:
        return f"unknown ({type(exc).__name__}: {exc})"
    lines = [l.strip() for l in out.stdout.splitlines() if l.strip()]
    return lines[-1] if lines else None


def run_ncu(ncu: str, metrics: list[str], child_args: list[str], kernel_filter: str | None,
            launch_count: int | None, timeout_s: float) -> dict:
    """One ncu run; returns its rows (one dict per profiled kernel) and diagnostics."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "ncu.log"
        cmd = [ncu, "--clock-control", "none", "--profile-from-start", "off",
               "--target-processes", "all", "--csv", "--log-file", str(log),
               "--metrics", ",".join(metrics)]
        if kernel_filter:
            cmd += ["-k", kernel_filter]
        if launch_count:
            cmd += ["--launch-count", str(launch_count)]
        cmd += [sys.executable, str(Path(__file__).resolve()), "--child", *child_args]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1.0, timeout_s))
            rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as exc:
            rc = "timeout"
            stdout = _text(exc.stdout)
            stderr = _text(exc.stderr)
        seconds = time.perf_counter() - start
        log_text = log.read_text(errors="replace") if log.exists() else ""
    rows = parse_ncu_csv(log_text) or parse_ncu_csv(stdout)
    messages = list(dict.fromkeys(m.strip() for m in NCU_ERROR_RE.findall(log_text + "\n" + stdout + "\n" + stderr)))
    child_lines = [l for l in stdout.splitlines() if l.startswith(("DEVICE ", "PROFILED ", "FAILED "))]
    return {"cmd": shlex.join(cmd), "rc": rc, "seconds": round(seconds, 2), "rows": rows,
            "ncu_messages": messages[:20], "child": child_lines,
            "tail": (stderr.strip().splitlines() or [""])[-5:] if rc != 0 else []}


def _text(data) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def parse_ncu_csv(text: str) -> list[dict]:
    """ncu --csv (details page): one line per (kernel, metric). Returns one dict per
    kernel, in profiling order: id, kernel name, block and grid size, metrics."""
    lines = text.splitlines()
    start = next((i for i, l in enumerate(lines) if l.startswith('"ID"')), None)
    if start is None:
        return []
    body = [lines[start]] + [l for l in lines[start + 1:] if l.startswith('"')]
    kernels: dict[str, dict] = {}
    for row in csv.DictReader(io.StringIO("\n".join(body))):
        kid = row.get("ID")
        if kid is None or not row.get("Metric Name"):
            continue
        k = kernels.setdefault(kid, {"id": kid, "kernel_name": row.get("Kernel Name"),
                                     "block_size": row.get("Block Size"),
                                     "grid_size": row.get("Grid Size"), "metrics": {}})
        raw = (row.get("Metric Value") or "").strip()
        k["metrics"][row["Metric Name"]] = {"value": to_number(raw), "unit": row.get("Metric Unit") or "",
                                            "raw": raw}
    return list(kernels.values())


def to_number(raw: str):
    try:
        return float(raw.replace(",", ""))
    except ValueError:
        return None  # "n/a" and the like


def rejected_metrics(result: dict, metrics: list[str]) -> list[str]:
    """Metric names ncu complained about in its ERROR/WARNING lines, or that came back n/a."""
    text = "\n".join(result["ncu_messages"] + result["tail"])
    bad = [m for m in metrics if m in text or m.split(".")[0] + " " in text
           or m.split(".")[0] + "'" in text or m.split(".")[0] + '"' in text]
    return bad


def probe_metrics(ncu: str, wanted: list[str], deadline: float) -> tuple[list[str], dict, list[dict], str | None]:
    """Find the metrics ncu accepts, on a tiny kernel. Returns (accepted, failed{name: why},
    attempts, device name)."""
    metrics, failed, attempts, device = list(wanted), {}, [], None
    for _ in range(PROBE_TRIES):
        if not metrics:
            break
        res = run_ncu(ncu, metrics, ["--impl", "probe"], None, 1, min(90.0, deadline - time.time()))
        attempts.append(summary_of(res, "probe"))
        device = device or next((l[7:] for l in res["child"] if l.startswith("DEVICE ")), None)
        rows = res["rows"]
        if rows and res["rc"] == 0:
            got = rows[0]["metrics"]
            for m in metrics:
                if m not in got:
                    failed[m] = "not in ncu's output"
                elif got[m]["value"] is None and m not in ("launch__grid_size", "launch__block_size"):
                    failed[m] = f"value {got[m]['raw']!r} on the probe kernel"
            # n/a on a trivial kernel may still be fine on a real one: keep those, drop missing
            return [m for m in metrics if failed.get(m) != "not in ncu's output"], failed, attempts, device
        bad = rejected_metrics(res, metrics)
        text = " ".join(res["ncu_messages"] + res["tail"])
        if not bad and ("ERR_NVGPUCTRPERM" in text or "permission" in text.lower()):
            return metrics, failed, attempts, device  # no counters at all: nothing to probe
        if not bad:  # unnamed failure: keep the names ncu lists, then only the six
            listed = query_metric_bases(ncu)
            bad = [m for m in metrics if listed and not m.startswith("launch__")
                   and m.split(".")[0] not in listed]
            if not bad and set(metrics) - set(METRICS):
                bad = [m for m in metrics if m not in METRICS]
            if not bad:
                return metrics, failed, attempts, device
            for m in bad:
                failed[m] = "dropped after an unexplained ncu failure" + (
                    " (not in ncu --query-metrics)" if listed and m.split(".")[0] not in listed else "")
            metrics = [m for m in metrics if m not in bad]
            continue
        for m in bad:
            failed[m] = "rejected by ncu: " + next((x for x in res["ncu_messages"] if m.split(".")[0] in x),
                                                   "see attempts")[:300]
        metrics = [m for m in metrics if m not in bad]
        if time.time() > deadline:
            break
    return metrics, failed, attempts, device


def query_metric_bases(ncu: str) -> set[str]:
    """Base metric names that `ncu --query-metrics` lists for the GPU (empty if it fails)."""
    try:
        out = subprocess.run([ncu, "--query-metrics"], capture_output=True, text=True, timeout=60)
    except Exception:
        return set()
    return {m.group(0) for m in (re.match(r"[a-z0-9]+__[A-Za-z0-9_]+", l) for l in out.stdout.splitlines()) if m}


def summary_of(res: dict, what: str) -> dict:
    return {"what": what, "cmd": res["cmd"], "rc": res["rc"], "seconds": res["seconds"],
            "kernels": len(res["rows"]), "ncu_messages": res["ncu_messages"],
            "child": res["child"], "tail": res["tail"]}


def record(impl: str, dtype: str, p, row: dict | None, status: str, message: str | None = None) -> dict:
    b, h, s, d, c = p
    out = {"impl": impl, "dtype": dtype, "batch": b, "heads": h, "seqlen": s, "headdim": d,
           "causal": c, "status": status}
    if message:
        out["message"] = message
    if row:
        out.update({"kernel_name": row["kernel_name"], "block_size": row["block_size"],
                    "grid_size": row["grid_size"], "metrics": row["metrics"]})
    return out


def child_failure(res: dict, text: str) -> str | None:
    for line in res["child"]:
        if line.startswith(f"FAILED {text} "):
            return line[len(f"FAILED {text} "):]
    return None


def profile_impl(ncu, impl, dtype, points, metrics, deadline) -> tuple[list[dict], list[dict]]:
    """All points of one implementation in one ncu run; per-point runs if that fails."""
    texts = [point_arg(p) for p in points]
    base = ["--impl", impl, "--dtype", dtype]
    attempts = []
    remaining = deadline - time.time()
    if remaining < 10:
        return [record(impl, dtype, p, None, "skipped", "time budget spent") for p in points], attempts
    res = run_ncu(ncu, metrics, base + ["--points", ",".join(texts)], FILTERS[impl], None,
                  min(remaining, 60 + 25 * len(points)))
    attempts.append(summary_of(res, f"{impl} all points"))
    profiled = [l.split()[1] for l in res["child"] if l.startswith("PROFILED ")]
    rows = res["rows"]
    done: dict[str, dict] = {}
    if rows and len(rows) == len(profiled):  # one kernel per profiled call, in order
        for text, row in zip(profiled, rows):
            done[text] = record(impl, dtype, parse_point(text), row, "ok")
    elif not rows and res["rc"] == 0 and len(profiled) == len(points):
        msg = f"the kernel filter {FILTERS[impl]!r} matched no kernel"
        return [record(impl, dtype, p, None, "error", msg) for p in points], attempts
    for text in texts:  # a call that raised is recorded as such; running it again would not help
        why = child_failure(res, text)
        if why and text not in done:
            done[text] = record(impl, dtype, parse_point(text), None, "error", why)
    if len(done) == len(points):
        return [done[t] for t in texts], attempts

    # Fall back: one ncu process per point left, first matching kernel of the profiled call.
    results = []
    for p, text in zip(points, texts):
        if text in done:
            results.append(done[text])
            continue
        remaining = deadline - time.time()
        if remaining < 8:
            results.append(record(impl, dtype, p, None, "skipped", "time budget spent"))
            continue
        r1 = run_ncu(ncu, metrics, base + ["--points", text], FILTERS[impl], 1, min(remaining, 60))
        attempts.append(summary_of(r1, f"{impl} {text}"))
        if r1["rows"]:
            results.append(record(impl, dtype, p, r1["rows"][0], "ok"))
            continue
        why = (child_failure(r1, text) or "; ".join(r1["ncu_messages"][:3])
               or ("ncu timed out" if r1["rc"] == "timeout" else f"ncu rc {r1['rc']}, no kernel profiled")
               + (f" ({' | '.join(r1['tail'])})" if r1["tail"] else ""))
        results.append(record(impl, dtype, p, None, "error", why[:600]))
    return results, attempts


def card_from(device: str | None) -> str:
    if not device:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            device = out.stdout.strip().splitlines()[0] if out.stdout.strip() else None
        except Exception:
            device = None
    return re.sub(r"[^A-Za-z0-9.-]+", "_", device or "unknown_gpu").strip("_"), device


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    tmp.replace(path)


def parent_main(args, argv) -> int:
    start = time.time()
    deadline = start + args.budget
    ncu = shutil.which(args.ncu) or (args.ncu if Path(args.ncu).exists() else None)
    meta = {"kind": "occupancy", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join(["python3", *argv]), "ncu": ncu, "dtype": args.dtype,
            "warmup_calls": WARMUP_CALLS, "filters": {i: FILTERS[i] for i in args.impls}}
    points = args.points
    if ncu is None:
        card, device = card_from(None)
        meta.update({"device": device, "error": f"{args.ncu} not found on PATH"})
        out = args.out / f"{args.card or card}-occupancy.json"
        write_json(out, {"meta": meta, "points": [record(i, args.dtype, p, None, "error", meta["error"])
                                                  for i in args.impls for p in points], "attempts": []})
        print(f"ERROR: {meta['error']}; wrote {out}")
        return 0
    meta["ncu_version"] = ncu_version(ncu)
    wanted = METRICS + ([] if args.no_extra else EXTRA_METRICS)
    metrics, failed, attempts, device = probe_metrics(ncu, wanted, deadline)
    card, device = card_from(device)
    card = args.card or card
    meta.update({"device": device, "metrics_requested": wanted, "metrics_used": metrics,
                 "metrics_failed": failed})
    out = args.out / f"{card}-occupancy.json"
    probe_ok = attempts and attempts[-1]["rc"] == 0 and attempts[-1]["kernels"] > 0
    print(f"{device} | {meta['ncu_version']} | probe {'ok' if probe_ok else 'FAILED'} "
          f"({time.time() - start:.0f}s) | {len(metrics)} metrics, {len(failed)} dropped/n-a", flush=True)
    for m, why in failed.items():
        print(f"  metric {m}: {why}", flush=True)
    if not probe_ok:
        why = "; ".join(attempts[-1]["ncu_messages"][:3]) if attempts else "no probe ran"
        meta["probe_error"] = why or f"rc {attempts[-1]['rc']}: {' | '.join(attempts[-1]['tail'])}"
        print(f"  probe failed: {meta['probe_error']} -- trying the real points anyway", flush=True)

    results = []
    for impl in args.impls:
        rows, att = profile_impl(ncu, impl, args.dtype, points, metrics, deadline)
        results += rows
        attempts += att
        for r in rows:
            m = r.get("metrics", {})

            def val(name, fmt="{:.1f}"):
                v = m.get(name, {}).get("value")
                return "-" if v is None else fmt.format(v)
            extra = (f"occ {val(METRICS[0])}% (theor {val(METRICS[1])}%) regs {val(METRICS[4], '{:.0f}')} "
                     f"tensor {val(METRICS[3])}% sm {val(METRICS[2])}%" if r["status"] == "ok"
                     else r.get("message", ""))
            print(f"{impl:10s} {point_label((r['batch'], r['heads'], r['seqlen'], r['headdim'], r['causal'])):24s} "
                  f"{r['status']:7s} {extra} | t+{time.time() - start:.0f}s", flush=True)
        write_json(out, {"meta": {**meta, "seconds": round(time.time() - start, 1)},
                         "points": results, "attempts": attempts})
    meta["seconds"] = round(time.time() - start, 1)
    write_json(out, {"meta": meta, "points": results, "attempts": attempts})
    print(f"wrote {out} ({meta['seconds']:.0f} s)", flush=True)
    return 0


def parse_impls(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = sorted(set(names) - set(IMPLS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown implementation(s) {unknown}; choose from {','.join(IMPLS)}")
    return names


def parse_points(text: str):
    try:
        return [parse_point(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"points are BxHxSxD[c], comma separated; got {text!r}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impls", type=parse_impls, default=list(IMPLS),
                        help=f"comma list from {','.join(IMPLS)} (default: all)")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--points", default=",".join(point_arg(p) for p in DEFAULT_POINTS),
                        help="comma list of BxHxSxD, 'c' suffix for causal (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=HERE / "results",
                        help="directory for <card>-occupancy.json (default: benchmarks/results)")
    parser.add_argument("--card", default=None, help="file name stem instead of the GPU's name")
    parser.add_argument("--ncu", default=os.environ.get("NCU", "ncu"), help="ncu executable (default: ncu, or $NCU)")
    parser.add_argument("--budget", type=float, default=170.0, help="seconds for the whole run (default 170)")
    parser.add_argument("--no-extra", action="store_true", help="only the six metrics of the issue")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args)
    args.points = parse_points(args.points)
    return parent_main(args, [sys.argv[0], *argv])


if __name__ == "__main__":
    sys.exit(main())
