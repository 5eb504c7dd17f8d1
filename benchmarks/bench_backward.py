"""Time the backward pass (dQ, dK, dV) of tvm_flash beside SDPA's flash and cuDNN backends.

Same inputs, same process, median of triton's ``do_bench`` over ``out.backward(dout)`` with the
forward outside the timed region (``retain_graph``); TFLOP/s with backward FLOPs = 2.5x the
forward's 4*B*H*Sq*Sk*D (halved when causal).  Before timing, each implementation's gradients
are checked against SDPA's math backend in float64 on the same inputs.

    python3 benchmarks/bench_backward.py [--shapes 4,16,1024,64;4,16,1024,128] [--dtype bf16] [--causal 0,1]

``--knobs '[{...}, ...]'`` instead times the two kernels of the Hopper wgmma backward
(``schedules/cuda_wgmma_bwd.py``) directly at each knob set (merged over its defaults), each
checked against the same float64 gradients.
"""

import argparse
import json
import math
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


def main():
    from triton.testing import do_bench

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4,16,1024,64;4,16,1024,128", help="B,H,S,D;...")
    ap.add_argument("--dtype", choices=sorted(DT), default="bf16")
    ap.add_argument("--causal", default="0,1")
    ap.add_argument("--knobs", default=None, help="JSON list of wgmma backward knob sets")
    a = ap.parse_args()
    dt = DT[a.dtype]
    print(torch.cuda.get_device_name(), a.dtype)
    for shape in a.shapes.split(";"):
        b, h, s, d = map(int, shape.split(","))
        for causal in map(int, a.causal.split(",")):
            torch.manual_seed(0)
            q, k, v, dout = (torch.randn(b, h, s, d, device="cuda", dtype=dt) for _ in range(4))
            impls = {"tvm_flash": lambda q, k, v: tvm_flash.attention(q, k, v, causal=bool(causal))}
            if dt != torch.float32:
                for name, be in (("sdpa flash", SDPBackend.FLASH_ATTENTION), ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION)):
                    impls[name] = lambda q, k, v, be=be: _sdpa(q, k, v, causal, be)
            _, ref = grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=bool(causal)),
                           *(t.double() for t in (q, k, v, dout)))
            flops = 2.5 * 4 * b * h * s * s * d / (2 if causal else 1)
            if a.knobs:
                for kn in json.loads(a.knobs):
                    print(f"B{b} H{h} S{s} D{d} causal={causal} {kn}: {_knob_run(kn, q, k, v, dout, causal, ref, flops)}",
                          flush=True)
                continue
            line = f"B{b} H{h} S{s} D{d} causal={causal}:"
            for name, fn in impls.items():
                _, g = grads(fn, q, k, v, dout)
                err = max((x.double() - r).abs().max().item() for x, r in zip(g, ref))
                qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
                out = fn(qq, kk, vv)
                ms = do_bench(lambda: out.backward(dout, retain_graph=True), warmup=5, rep=50, grad_to_none=[qq, kk, vv],
                              return_mode="median")
                line += f"  {name} {flops / ms / 1e9:7.1f} TFLOP/s ({ms:.2f} ms, grad err {err:.1e})"
            print(line, flush=True)


_BUILT = {}  # compiled knob sets: (head dim, dtype, causal, knobs) -> module


def _knob_run(knobs, q, k, v, dout, causal, ref, flops):
    """Build the wgmma backward at ``knobs``, check its gradients, time dK/dV + dQ."""
    import tvm
    from triton.testing import do_bench

    from schedules import cuda_wgmma_bwd
    from tvm_flash.build import make_target
    from tvm_flash.ops import _backward_into, _forward

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
    kernels = (mod["flash_bwd_dkdv"], mod["flash_bwd_dq"], mod["flash_bwd_prep"])
    scale = 1 / math.sqrt(d)
    out, lse = _forward(q, k, v, bool(causal), scale)
    dlse = torch.zeros_like(lse)
    dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))

    def run():
        _backward_into(kernels, q, k, v, out, dout, lse, dlse, dq, dk, dv, scale)

    run()
    torch.cuda.synchronize()
    err = max((x.double() - r).abs().max().item() for x, r in zip((dq, dk, dv), ref))
    ms = do_bench(run, warmup=5, rep=50, return_mode="median")
    ms_dkdv = do_bench(lambda: kernels[0](q, k, v, out, dout, lse, dlse, dk, dv, scale), warmup=5, rep=50,
                       return_mode="median")  # dlse for delta: same time
    return (f"{flops / ms / 1e9:7.1f} TFLOP/s ({ms:.3f} ms = dK/dV {ms_dkdv:.3f} + delta pass and dQ ~{ms - ms_dkdv:.3f}, "
            f"grad err {err:.1e})")


def _sdpa(q, k, v, causal, backend):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=bool(causal))


if __name__ == "__main__":
    main()
