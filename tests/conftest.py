"""Shared test helpers: devices, random inputs, poisoned kernel runs and the accuracy rule.

Accuracy rule (as flash-attn's tests): against the float64 reference,
fp32 max abs error <= 1e-5; fp16/bf16 max abs error <= 2x the error of
torch's own attention in that dtype on the same inputs (+1e-6 so that two
exact results compare equal).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from tvm_flash.build import Workload
from tvm_flash.ops import _kernel, _seq_class
from tvm_flash.reference import attention_ref

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def rand_qkv(b, hq, hkv, sq, sk, d, dtype, device="cpu", seed=0):
    """Fresh normal random q, k, v (never zeros)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, d, generator=g)
    k = torch.randn(b, hkv, sk, d, generator=g)
    v = torch.randn(b, hkv, sk, d, generator=g)
    return (t.to(device, dtype) for t in (q, k, v))


def run_poisoned(q, k, v, causal, scale=None):
    """Call the compiled kernel directly on NaN-filled outputs; return (out, lse)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:3], float("nan"), dtype=torch.float32, device=q.device)
    kernel = _kernel(q.device.type, q.device.index, Workload(q.shape[-1], DTYPE_NAMES[q.dtype], causal),
                     _seq_class(q, k))  # the kernel attention() would pick for this length
    kernel(q, k, v, out, lse, float(scale))
    if q.is_cuda:
        torch.cuda.synchronize()
    return out, lse


def torch_attention(q, k, v, causal, scale=None):
    """torch's own attention in the inputs' dtype (SDPA, with GQA expanded)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def assert_accurate(q, k, v, causal, scale=None, check_lse=True):
    """Poisoned run + reference comparison with the project's accuracy rule."""
    out, lse = run_poisoned(q, k, v, causal, scale)
    assert not torch.isnan(out).any(), "some output elements were not written (NaN poison left)"
    assert not torch.isnan(lse).any(), "some lse elements were not written (NaN poison left)"
    ref, ref_lse = attention_ref(q, k, v, causal=causal, scale=scale)
    err = (out.double().cpu() - ref).abs().max().item()
    if q.dtype == torch.float32:
        bound = 1e-5
    else:
        torch_err = (torch_attention(q, k, v, causal, scale).double().cpu() - ref).abs().max().item()
        bound = 2 * torch_err + 1e-6
    assert err <= bound, f"max abs error {err:.3e} > bound {bound:.3e}"
    if check_lse:
        lse_err = (lse.double().cpu() - ref_lse).abs().max().item()
        assert lse_err <= 1e-4, f"lse max abs error {lse_err:.3e}"
    return err
