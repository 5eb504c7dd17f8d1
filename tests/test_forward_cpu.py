"""Forward accuracy on the CPU (LLVM) against the float64 reference."""

import pytest
import torch
from conftest import assert_accurate, rand_qkv
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=False)


@settings(max_examples=40, **SETTINGS)
@given(
    b=st.integers(1, 3),
    hkv=st.integers(1, 4),
    group=st.integers(1, 4),
    sq=st.integers(1, 300),
    sk=st.integers(1, 300),
    d=st.sampled_from([32, 64, 80, 128]),
    causal=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_fp32_matches_reference(b, hkv, group, sq, sk, d, causal, seed):
    q, k, v = rand_qkv(b, hkv * group, hkv, sq, sk, d, torch.float32, seed=seed)
    assert_accurate(q, k, v, causal)


@settings(max_examples=12, **SETTINGS)
@given(
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
    hkv=st.integers(1, 2),
    group=st.integers(1, 2),
    sq=st.integers(1, 200),
    sk=st.integers(1, 200),
    d=st.sampled_from([64, 128]),
    causal=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_half_within_2x_torch_error(dtype, hkv, group, sq, sk, d, causal, seed):
    q, k, v = rand_qkv(2, hkv * group, hkv, sq, sk, d, dtype, seed=seed)
    assert_accurate(q, k, v, causal)


@pytest.mark.parametrize("d", [32, 96, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_other_head_dims(d, dtype):
    q, k, v = rand_qkv(1, 2, 1, 70, 45, d, dtype, seed=d)
    assert_accurate(q, k, v, causal=True)
