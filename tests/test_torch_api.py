"""The torch integration: SDPA compatibility, the custom op under torch.compile,
zero-copy outputs and no growth in memory over repeated calls."""

import gc
import tracemalloc

import pytest
import torch
import torch.nn.functional as F
from conftest import rand_qkv

import tvm_flash


def test_sdpa_compatible_4d_3d_and_gqa():
    q, k, v = rand_qkv(2, 4, 2, 40, 50, 64, torch.float32, seed=1)
    ours = tvm_flash.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    q3, k3, v3 = q[:, 0], k[:, 0], v[:, 0]
    torch.testing.assert_close(
        tvm_flash.scaled_dot_product_attention(q3, k3, v3, scale=0.2),
        F.scaled_dot_product_attention(q3, k3, v3, scale=0.2),
        atol=1e-5,
        rtol=0,
    )


def test_custom_op_is_registered_and_checked():
    q, k, v = rand_qkv(1, 2, 2, 16, 16, 32, torch.float32, seed=2)
    torch.library.opcheck(torch.ops.tvm_flash.flash_fwd.default, (q, k, v, True, 0.125),
                          test_utils=("test_schema", "test_faketensor"))


def test_works_under_torch_compile():
    def block(q, k, v):
        return tvm_flash.attention(q * 2, k, v, causal=True).relu() + 1

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    q, k, v = rand_qkv(1, 2, 2, 33, 33, 64, torch.float32, seed=3)
    torch.testing.assert_close(compiled(q, k, v), block(q, k, v), atol=0, rtol=0)


def test_repeated_calls_do_not_leak():
    q, k, v = rand_qkv(1, 2, 2, 64, 64, 64, torch.float32, seed=4)
    for _ in range(5):
        tvm_flash.attention(q, k, v)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for _ in range(200):
        tvm_flash.attention(q, k, v)
    gc.collect()
    grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename"))
    tracemalloc.stop()
    assert grown < 256 * 1024, f"python heap grew by {grown} bytes over 200 calls"


def test_torch_func_transforms_get_a_clear_error():
    """vmap / torch.func.grad are not supported: a NotImplementedError that says so (before, vmap
    failed deep inside with 'Cannot access data pointer')."""
    q, k, v = (torch.randn(1, 2, 8, 32) for _ in range(3))
    with pytest.raises(NotImplementedError, match="torch.func transforms"):
        torch.func.vmap(lambda x: tvm_flash.attention(x, k, v))(q.unsqueeze(0))
    with pytest.raises(NotImplementedError, match="torch.func transforms"):
        torch.func.grad(lambda x: tvm_flash.attention(x, k, v).sum())(q)


def test_tensor_subclass_goes_through_the_custom_op():
    """A __torch_dispatch__ subclass (TwoTensor here; DTensor the same way) reaches the kernels
    through the custom ops, with gradients, instead of a raw pointer it does not have."""
    from torch.testing._internal.two_tensor import TwoTensor

    q, k, v = (torch.randn(1, 2, 16, 32) for _ in range(3))
    tq = TwoTensor(q, q.clone()).requires_grad_()
    out = tvm_flash.attention(tq, k, v)
    assert isinstance(out, TwoTensor)
    assert (out.a - F.scaled_dot_product_attention(q, k, v)).abs().max().item() <= 1e-5
    out.sum().backward()
    assert isinstance(tq.grad, TwoTensor)
