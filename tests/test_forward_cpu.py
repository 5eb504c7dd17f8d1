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


@pytest.mark.parametrize("vectorized", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_cpu_kernels(vectorized, dtype):
    """The vectorized CPU kernel (default) and the generic schedule (a tuning log may pick
    either) on tails, GQA, Sq != Sk and causal, with NaN-poisoned outputs."""
    import math

    from conftest import torch_attention

    from tvm_flash.build import Workload, get_kernel, make_target
    from tvm_flash.reference import attention_ref

    for i, (hq, hkv, sq, sk, d, causal) in enumerate([(4, 2, 77, 130, 40, True), (2, 1, 129, 65, 64, False),
                                                      (3, 3, 1, 1, 128, True), (2, 2, 200, 33, 256, True),
                                                      (2, 1, 70, 90, 80, False)]):
        name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
        kernel = get_kernel(Workload(d, name, causal), make_target("llvm", "host"), {"vectorized": vectorized})
        q, k, v = rand_qkv(2, hq, hkv, sq, sk, d, dtype, seed=50 + i)
        out, lse = torch.full_like(q, float("nan")), torch.full(q.shape[:3], float("nan"))
        kernel(q, k, v, out, lse, 1 / math.sqrt(d))
        ref, ref_lse = attention_ref(q, k, v, causal=causal)
        err = (out.double() - ref).abs().max().item()
        bound = 1e-5 if dtype == torch.float32 else 2 * (torch_attention(q, k, v, causal).double() - ref).abs().max().item()
        assert err <= bound, f"{(hq, hkv, sq, sk, d, causal)}: {err:.3e} > {bound:.3e}"
        assert (lse.double() - ref_lse).abs().max().item() <= 1e-4


@pytest.mark.parametrize("block_m,block_n", [(16, 64), (32, 16), (64, 32), (16, 16)])
def test_vectorized_kernel_tile_sizes(block_m, block_n):
    """The vectorized CPU kernel at the other tile sizes its knob space offers (a tuning log may
    pick them): query tiles narrower than a vector register, key tiles of one register block."""
    import math

    from tvm_flash.build import Workload, get_kernel, make_target
    from tvm_flash.reference import attention_ref

    for i, (hq, hkv, sq, sk, d, causal) in enumerate([(4, 2, 77, 130, 40, True), (2, 1, 33, 70, 128, False)]):
        kernel = get_kernel(Workload(d, "float32", causal), make_target("llvm", "host"),
                            {"vectorized": 1, "block_m": block_m, "block_n": block_n})
        q, k, v = rand_qkv(1, hq, hkv, sq, sk, d, torch.float32, seed=70 + i)
        out, lse = torch.full_like(q, float("nan")), torch.full(q.shape[:3], float("nan"))
        kernel(q, k, v, out, lse, 1 / math.sqrt(d))
        ref, ref_lse = attention_ref(q, k, v, causal=causal)
        assert (out.double() - ref).abs().max().item() <= 1e-5
        assert (lse.double() - ref_lse).abs().max().item() <= 1e-5
