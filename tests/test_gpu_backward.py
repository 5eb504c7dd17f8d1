"""The CUDA backward against float64 autograd: the wgmma kernels (``schedules.cuda_wgmma_bwd``,
Hopper, fp16/bf16 at head dims 64/128) and the plain FFMA ones (``schedules.cuda_simt``).

The kernels are called directly on NaN-poisoned dQ/dK/dV, then once end to end through
``loss.backward()``.  Accuracy rule as on the CPU: fp32 within 1e-5; fp16/bf16 within 2x
the error of torch's own attention backward (SDPA on the GPU) in that dtype, +1e-6.
"""

import math

import pytest
import torch

from conftest import DTYPE_NAMES, gpu
from test_backward_cpu import grad_bounds, make, ours_grads, ref_grads
from tvm_flash.ops import _backward_into, _backward_kernels
from tvm_flash.workload import Workload

pytestmark = gpu

CASES = [  # dtype, b, hq, hkv, sq, sk, d, causal, with a gradient into the LSE
    (torch.float32, 2, 4, 2, 200, 150, 64, False, True),
    (torch.float32, 1, 2, 1, 77, 300, 128, True, True),
    (torch.float32, 1, 4, 1, 300, 77, 32, True, True),
    (torch.bfloat16, 2, 4, 2, 129, 129, 64, True, False),  # wgmma from here on (on Hopper) ...
    (torch.bfloat16, 1, 2, 1, 200, 333, 128, False, False),
    (torch.float16, 1, 4, 2, 333, 517, 64, False, True),
    (torch.bfloat16, 1, 3, 1, 300, 77, 128, True, True),  # Sq > Sk: key tiles past the queries
    (torch.float16, 2, 2, 2, 77, 300, 128, True, False),
    (torch.bfloat16, 1, 2, 2, 1, 1, 128, True, False),  # one query, one key
    (torch.bfloat16, 1, 2, 1, 64, 300, 128, True, False),  # key tiles no query sees: dK = dV = 0
    (torch.float16, 1, 2, 1, 128, 300, 64, True, False),  # ... at hd64 (128-query steps: n_t = 0 there)
    (torch.bfloat16, 1, 4, 2, 300, 300, 128, True, False),  # causal GQA; dq_rotate: CTA 1 starts past i0
    (torch.float16, 1, 4, 4, 100, 100, 96, True, False),  # ... plain FFMA (head dim 96)
]


@pytest.mark.parametrize("dtype,b,hq,hkv,sq,sk,d,causal,with_dlse", CASES)
def test_cuda_backward_kernels_poisoned(dtype, b, hq, hkv, sq, sk, d, causal, with_dlse):
    kernels = _backward_kernels("cuda", torch.cuda.current_device(), Workload(d, DTYPE_NAMES[dtype], causal))
    _check_poisoned(kernels, dtype, b, hq, hkv, sq, sk, d, causal, with_dlse)


WGMMA_BWD_VARIANTS = [  # knob sets of the wgmma backward beside the defaults
    {"tma": 0},  # all threads load by cp.async (the defaults: thread 0 by TMA)
    {"tma": 1, "num_stages": 3, "lag": 0, "block_n": 64},  # TMA, two tiles in flight (prologue loop)
    {"dq_accum": 1},  # dQ from the dK/dV kernel: fp32 bulk reductions (TMA), then a convert pass (causal default)
    {"dq_accum": 1, "tma": 0},  # the same, cp.async loads
    {"dq_accum": 0},  # a dQ kernel of its own (the non-causal default; deterministic_knobs)
    {"dq_accum": 1, "dq_wg_sum": 1},  # hd64: the warpgroups sum in shared memory, one reduction (v6)
    {"dq_accum": 1, "dq_l2_hint": 1},  # the reductions with an L2 evict-last policy
    {"dq_accum": 1, "dq_rotate": 1},  # each CTA walks its query tiles from its own start (v7)
    {"dq_accum": 1, "dq_first": 1},  # dQ_part before dK, its reduction while dK runs (v8)
    {"block_q": 64},  # hd64: 64 queries per dK/dV step (the default before v9; now 128)
]


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="the wgmma backward needs a Hopper GPU (sm_90a)")
@pytest.mark.parametrize("knobs", WGMMA_BWD_VARIANTS, ids=lambda kn: "-".join(f"{k}{v}" for k, v in kn.items()))
@pytest.mark.parametrize("dtype,b,hq,hkv,sq,sk,d,causal,with_dlse", [c for c in CASES if c[0] != torch.float32 and c[6] in (64, 128)])
def test_wgmma_backward_variants_poisoned(knobs, dtype, b, hq, hkv, sq, sk, d, causal, with_dlse):
    import tvm

    from schedules import cuda_wgmma_bwd
    from tvm_flash.build import BackwardKernels, make_target

    if knobs.get("dq_wg_sum") and d != 64:
        pytest.skip("dq_wg_sum is for head dim 64")
    funcs = cuda_wgmma_bwd.schedule_backward(d, DTYPE_NAMES[dtype], causal, **knobs)
    mod = tvm.compile(tvm.IRModule(funcs), target=make_target("cuda", "sm_90a"))
    kernels = BackwardKernels(mod, funcs)
    assert kernels.dq_accum == bool({**cuda_wgmma_bwd.default_knobs_backward(d, causal), **knobs}["dq_accum"])
    _check_poisoned(kernels, dtype, b, hq, hkv, sq, sk, d, causal, with_dlse)


def _check_poisoned(kernels, dtype, b, hq, hkv, sq, sk, d, causal, with_dlse):
    q, k, v, do = make(b, hq, hkv, sq, sk, d, dtype, seed=sq + sk + d)
    dlse = torch.randn(b, hq, sq) if with_dlse else None
    ref = ref_grads(q, k, v, do, causal, dlse)
    # the forward on the GPU gives out and lse, as autograd would
    qc, kc, vc, doc = (t.cuda() for t in (q, k, v, do))
    from tvm_flash.ops import _forward

    scale = 1 / math.sqrt(d)
    out, lse = _forward(qc, kc, vc, causal, scale)
    dq, dk, dv = (torch.full_like(t, float("nan")) for t in (qc, kc, vc))
    grad_lse = (dlse if dlse is not None else torch.zeros(b, hq, sq)).cuda()
    _backward_into(kernels, qc, kc, vc, out, doc, lse, grad_lse, dq, dk, dv, scale)
    torch.cuda.synchronize()
    for name, a, r, bound in zip(("dq", "dk", "dv"), (dq, dk, dv), ref, grad_bounds(q, k, v, do, causal, ref, "cuda")):
        assert not torch.isnan(a).any(), f"{name}: elements not written (NaN poison left)"
        err = (a.double().cpu() - r).abs().max().item()
        assert err <= bound, f"{name}: max abs error {err:.3e} > {bound:.3e}"


def test_cuda_backward_through_autograd():
    q, k, v, do = make(1, 4, 2, 150, 150, 64, torch.bfloat16, seed=7)
    ref = ref_grads(q, k, v, do, True)
    ours = ours_grads(q.cuda(), k.cuda(), v.cuda(), do.cuda(), True)
    for name, a, r, bound in zip(("dq", "dk", "dv"), ours, ref, grad_bounds(q, k, v, do, True, ref, "cuda")):
        assert a.is_cuda and a.dtype == q.dtype, name
        err = (a.double().cpu() - r).abs().max().item()
        assert err <= bound, f"{name}: max abs error {err:.3e} > {bound:.3e}"


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="the wgmma backward needs a Hopper GPU (sm_90a)")
def test_deterministic_algorithms_give_reproducible_gradients():
    """The causal wgmma backward adds dQ with atomics (``dq_accum``): its gradients may differ in
    the last bit between runs.  Under ``torch.use_deterministic_algorithms(True)`` the backward
    takes the kernels without atomics, and two runs agree bit for bit (and with the reference)."""
    import tvm_flash

    wl = Workload(128, "bfloat16", True)
    assert _backward_kernels("cuda", torch.cuda.current_device(), wl).dq_accum
    assert not _backward_kernels("cuda", torch.cuda.current_device(), wl, True).dq_accum
    q, k, v, do = make(1, 4, 2, 700, 700, 128, torch.bfloat16, seed=5)
    ref = ref_grads(q, k, v, do, True)
    bounds = grad_bounds(q, k, v, do, True, ref, device="cuda")
    qc, kc, vc = (t.cuda().requires_grad_() for t in (q, k, v))
    torch.use_deterministic_algorithms(True)
    try:
        runs = [torch.autograd.grad(tvm_flash.attention(qc, kc, vc, causal=True), (qc, kc, vc), do.cuda())
                for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    for got, r, bound in zip(runs[0], ref, bounds):
        assert (got.double().cpu() - r).abs().max().item() <= bound
