"""Edge cases of the forward pass: tiny and odd lengths, Sq != Sk causal, MQA,
extreme logits, NaN propagation, non-contiguous inputs, custom scale."""

import math

import pytest
import torch
from conftest import assert_accurate, rand_qkv, run_poisoned

import tvm_flash
from tvm_flash.reference import attention_ref


@pytest.mark.parametrize(
    "sq,sk",
    [(1, 1), (1, 300), (300, 1), (33, 31), (64, 64), (100, 37), (37, 100), (65, 129)],
)
@pytest.mark.parametrize("causal", [False, True])
def test_lengths(sq, sk, causal):
    q, k, v = rand_qkv(2, 4, 2, sq, sk, 64, torch.float32, seed=sq * 1000 + sk)
    assert_accurate(q, k, v, causal)


def test_mqa_single_kv_head():
    q, k, v = rand_qkv(2, 8, 1, 50, 70, 64, torch.float32, seed=3)
    assert_accurate(q, k, v, causal=True)


def test_custom_scale():
    q, k, v = rand_qkv(1, 2, 2, 40, 40, 64, torch.float32, seed=4)
    assert_accurate(q, k, v, causal=False, scale=0.3)


def test_numpy_scalar_scale_is_accepted():
    import numpy as np

    q, k, v = rand_qkv(1, 2, 2, 20, 20, 32, torch.float32, seed=9)
    ref, _ = attention_ref(q, k, v, scale=0.25)
    out = tvm_flash.attention(q, k, v, scale=np.float32(0.25))
    assert (out.double() - ref).abs().max().item() <= 1e-5


def test_huge_logits_stay_finite():
    # q.k ~ 1e4 after scaling: max-subtraction must keep exp() in range.
    q, k, v = rand_qkv(1, 2, 2, 40, 40, 64, torch.float32, seed=5)
    q = q * 400.0
    out, lse = run_poisoned(q, k, v, causal=False)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    ref, _ = attention_ref(q, k, v)
    assert (out.double() - ref).abs().max().item() < 1e-4


def test_nan_propagates_to_its_row_only():
    q, k, v = rand_qkv(1, 1, 1, 40, 40, 64, torch.float32, seed=6)
    q[0, 0, 7, 3] = float("nan")
    out = tvm_flash.attention(q, k, v)
    assert torch.isnan(out[0, 0, 7]).all()
    assert torch.isfinite(out[0, 0, :7]).all() and torch.isfinite(out[0, 0, 8:]).all()
    v[0, 0, 5, 0] = float("nan")  # a NaN value reaches every row that attends to key 5
    out = tvm_flash.attention(q, k, v, causal=True)
    assert torch.isnan(out[0, 0, 5:, 0]).all()


def test_non_contiguous_inputs_are_accepted():
    q, k, v = rand_qkv(2, 4, 4, 50, 50, 64, torch.float32, seed=7)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, [B, S, H, D] memory
    assert not qt.is_contiguous()
    out = tvm_flash.attention(qt, k[:, :, ::1], v, causal=True)
    ref, _ = attention_ref(q, k, v, causal=True)
    assert (out.double() - ref).abs().max().item() <= 1e-5


def test_return_lse_matches_reference():
    q, k, v = rand_qkv(1, 2, 1, 90, 60, 32, torch.float32, seed=8)
    out, lse = tvm_flash.attention(q, k, v, causal=True, return_lse=True)
    ref, ref_lse = attention_ref(q, k, v, causal=True)
    assert lse.dtype == torch.float32 and lse.shape == (1, 2, 90)
    assert (lse.double() - ref_lse).abs().max().item() < 1e-5
    assert (out.double() - ref).abs().max().item() < 1e-5
    assert math.isclose(out.sum().item(), ref.sum().item(), rel_tol=1e-4, abs_tol=1e-3)


def test_unaligned_storage_offset_is_handled():
    d = 64
    flat = torch.randn(1 + 2 * 50 * d)[1:]  # starts 4 bytes past an aligned address
    q = flat.view(1, 2, 50, d)
    assert q.is_contiguous() and q.data_ptr() % 16 != 0
    k, v = torch.randn(1, 2, 50, d), torch.randn(1, 2, 50, d)
    ref, _ = attention_ref(q, k, v)
    assert (tvm_flash.attention(q, k, v).double() - ref).abs().max().item() <= 1e-5
