"""Time the backward pass (dQ, dK, dV) of tvm_flash beside SDPA's flash and cuDNN backends.

Same inputs, same process, median of triton's ``do_bench`` over ``out.backward(dout)`` with the
forward outside the timed region (``retain_graph``); TFLOP/s with backward FLOPs = 2.5x the
forward's 4*B*H*Sq*Sk*D (halved when causal).  Before timing, each implementation's gradients
are checked against SDPA's math backend in float64 on the same inputs.

    python3 benchmarks/bench_backward.py [--shapes 4,16,1024,64;4,16,1024,128] [--dtype bf16] [--causal 0,1]
    python3 benchmarks/bench_backward.py --sweep fa --dtype both --out benchmarks/results

``--sweep fa`` runs the FlashAttention papers' sweep instead of ``--shapes`` (16k tokens, hidden
2048, head dims 64 and 128, seq 512-16k, causal and not; ``--dtype both`` for bf16 + fp16) and
``--out DIR`` writes ``DIR/<card>-backward.json`` (``-backward-shapes.json`` without
``--sweep``; rewritten after every point), which ``benchmarks/report.py`` turns into
BENCHMARKS.md's backward section.  The float64 reference covers the first and the last (batch,
head) (so that it fits at seq 16k): per gradient (dQ, dK, dV) tvm_flash's max abs error against
2x that of SDPA's default backend (torch's own) in the same dtype, +1e-6.

``--knobs '[{...}, ...]'`` instead times the two kernels of the Hopper wgmma backward
(``schedules/cuda_wgmma_bwd.py``) directly at each knob set (merged over its defaults), each
checked against the same float64 gradients.
"""

import argparse
import json
import math
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tvm_flash  # noqa: E402

DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def grads(fn, q, k, v, dout):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout)
    return out, (q.grad, k.grad, v.grad)


FA_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
SLICES = ((slice(0, 1), slice(0, 1)), (slice(-1, None), slice(-1, None)))  # (batch, head) checked


def _grad_errors(per_slice, refs):
    """Max |grad - float64| of dQ, dK, dV over the checked (batch, head) slices: ``per_slice``
    and ``refs`` hold one (dQ, dK, dV) per slice of ``SLICES``."""
    return [max((gs[i].double() - r[i]).abs().max().item() for gs, r in zip(per_slice, refs)) for i in range(3)]


def main():
    from triton.testing import do_bench

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4,16,1024,64;4,16,1024,128", help="B,H,S,D;...")
    ap.add_argument("--sweep", choices=["fa"], help="the FlashAttention papers' sweep instead of --shapes")
    ap.add_argument("--dtype", choices=[*sorted(DT), "both"], default="bf16", help="both: bf16 then fp16")
    ap.add_argument("--causal", default="0,1")
    ap.add_argument("--knobs", default=None, help="JSON list of wgmma backward knob sets")
    ap.add_argument("--out", type=Path, help="write <card>-backward.json here")
    a = ap.parse_args()
    dtypes = ["bf16", "fp16"] if a.dtype == "both" else [a.dtype]
    if a.sweep:
        shapes = [(16384 // s, 2048 // d, s, d) for d in (64, 128) for s in FA_SEQLENS]
    else:
        shapes = [tuple(map(int, shape.split(","))) for shape in a.shapes.split(";")]
    print(torch.cuda.get_device_name(), ",".join(dtypes), flush=True)
    meta = _metadata(a)
    points = []
    for dname in dtypes:
        dt = DT[dname]
        for b, h, s, d in shapes:
            for causal in map(int, a.causal.split(",")):
                torch.manual_seed(len(points))
                q, k, v, dout = (torch.randn(b, h, s, d, device="cuda", dtype=dt) for _ in range(4))
                impls = {"tvm_flash": lambda q, k, v: tvm_flash.attention(q, k, v, causal=bool(causal))}
                if dt != torch.float32:
                    for name, be in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
                        impls[name] = lambda q, k, v, be=be: _sdpa(q, k, v, causal, be)
                # float64 gradients of the first and the last (batch, head) (heads are independent):
                # fits at seq 16k, and a wrong batch/head offset shows
                sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=bool(causal))  # noqa: E731
                refs = [grads(sdpa, *(t[sl].double() for t in (q, k, v, dout)))[1] for sl in SLICES]
                ref = refs[0]
                flops = 2.5 * 4 * b * h * s * s * d / (2 if causal else 1)
                if a.knobs:
                    for kn in json.loads(a.knobs):
                        print(f"B{b} H{h} S{s} D{d} causal={causal} {kn}: "
                              f"{_knob_run(kn, q, k, v, dout, causal, ref, flops)}", flush=True)
                    continue
                line = f"{dname} B{b} H{h} S{s} D{d} causal={causal}:"
                results = {}
                for name, fn in impls.items():
                    try:
                        _, g = grads(fn, q, k, v, dout)
                        errs = _grad_errors([[x[sl] for x in g] for sl in SLICES], refs)
                        err = max(errs)
                        del g, _
                        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
                        out = fn(qq, kk, vv)
                        ms = do_bench(lambda: out.backward(dout, retain_graph=True), warmup=5, rep=50,
                                      grad_to_none=[qq, kk, vv], return_mode="median")
                        del out, qq, kk, vv
                    except Exception as exc:  # a backend that refuses the shape: recorded, not fatal
                        results[name] = {"status": "error", "message": f"{type(exc).__name__}: {exc}"[:300]}
                        line += f"  {name} ERR"
                        continue
                    results[name] = {"status": "ok", "ms": ms, "tflops": flops / ms / 1e9, "grad_err": err,
                                     "grad_errs_dq_dk_dv": errs}
                    line += f"  {name} {flops / ms / 1e9:7.1f} TFLOP/s ({ms:.2f} ms, grad err {err:.1e})"
                ours, accuracy = results["tvm_flash"].get("grad_errs_dq_dk_dv"), None
                if ours is not None:  # torch's own: SDPA's default backend in this dtype, same heads
                    theirs = _grad_errors([grads(sdpa, *(t[sl] for t in (q, k, v, dout)))[1] for sl in SLICES], refs)
                    accuracy = {"tvm_flash_max_abs_err": max(ours), "sdpa_max_abs_err": max(theirs),
                                "tvm_flash_errs_dq_dk_dv": ours, "sdpa_errs_dq_dk_dv": theirs,
                                "ok": all(o <= 2 * t + 1e-6 for o, t in zip(ours, theirs))}
                points.append({"dtype": dname, "batch": b, "heads": h, "seqlen": s, "headdim": d,
                               "causal": bool(causal), "flops": flops, "results": results, "accuracy": accuracy})
                print(line + ("" if accuracy is None else f"  accuracy {'ok' if accuracy['ok'] else 'BAD'}"), flush=True)
                del q, k, v, dout, ref, refs
                torch.cuda.empty_cache()
                if a.out:
                    a.out.mkdir(parents=True, exist_ok=True)
                    path = a.out / f"{_card()}-backward{'' if a.sweep else '-shapes'}.json"
                    tmp = path.with_name(path.name + ".tmp")
                    tmp.write_text(json.dumps({"meta": meta, "points": points}, indent=1) + "\n")
                    tmp.replace(path)


def _card():
    return re.sub(r"[^A-Za-z0-9.-]+", "_", torch.cuda.get_device_name()).strip("_")


def _metadata(a):
    import datetime
    import os
    import subprocess

    commit = os.environ.get("TVM_FLASH_GIT_COMMIT")
    if not commit:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                           cwd=Path(__file__).parent)
        commit = r.stdout.strip() or None
    try:
        import tvm
        tvm_version = tvm.__version__
    except Exception:
        tvm_version = None
    return {"kind": "backward", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "tvm": tvm_version,
            "tvm_flash": tvm_flash.__version__, "git_commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python3", *sys.argv]), "args": {k: str(v) for k, v in vars(a).items()},
            "warmup_ms": 5, "rep_ms": 50,
            "method": "median of triton do_bench (warmup 5 ms, rep 50 ms) over out.backward(dout), forward "
                      "outside; FLOPs 2.5 x 4*B*H*S^2*D (halved when causal)"}


_BUILT = {}  # compiled knob sets: (head dim, dtype, causal, knobs) -> module


def _knob_run(knobs, q, k, v, dout, causal, ref, flops):
    """Build the wgmma backward at ``knobs``, check its gradients, time dK/dV + dQ."""
    import tvm
    from triton.testing import do_bench

    from schedules import cuda_wgmma_bwd
    from tvm_flash.build import BackwardKernels, make_target
    from tvm_flash.ops import _backward_into, _dq_acc_shape, _forward

    d = q.shape[-1]
    dtype = str(q.dtype).removeprefix("torch.")
    try:
        funcs = cuda_wgmma_bwd.schedule_backward(d, dtype, bool(causal), **knobs)
    except ValueError as err:
        return f"rejected ({err})"
    key = json.dumps([d, dtype, bool(causal), knobs], sort_keys=True)
    if key not in _BUILT:
        _BUILT[key] = tvm.compile(tvm.IRModule(funcs), target=make_target("cuda", "sm_90a"))
    mod = _BUILT[key]
    kernels = BackwardKernels(mod, funcs)
    scale = 1 / math.sqrt(d)
    out, lse = _forward(q, k, v, bool(causal), scale)
    dlse = torch.zeros_like(lse)
    dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))

    def run():
        _backward_into(kernels, q, k, v, out, dout, lse, dlse, dq, dk, dv, scale)

    run()
    torch.cuda.synchronize()
    err = max((x[:1, :1].double() - r).abs().max().item() for x, r in zip((dq, dk, dv), ref))
    ms = do_bench(run, warmup=5, rep=50, return_mode="median")
    acc = ([torch.zeros(_dq_acc_shape(*q.shape), dtype=torch.float32, device=q.device)]
           if kernels.dq_accum else [])  # (timing only)
    ms_dkdv = do_bench(lambda: kernels[0](q, k, v, out, dout, lse, dlse, dk, dv, *acc, scale), warmup=5, rep=50,
                       return_mode="median")  # dlse for delta: same time
    return (f"{flops / ms / 1e9:7.1f} TFLOP/s ({ms:.3f} ms = dK/dV {ms_dkdv:.3f} + delta pass and dQ (dq_accum: zeroing + convert) ~{ms - ms_dkdv:.3f}, "
            f"grad err {err:.1e})")


def _sdpa(q, k, v, causal, backend):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=bool(causal))


if __name__ == "__main__":
    main()
