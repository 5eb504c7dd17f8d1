"""Bad input gets a clear Python error naming the argument; a CUDA backward is refused."""

import pytest
import torch

import tvm_flash


def qkv(shape_q=(1, 2, 8, 64), shape_kv=(1, 2, 8, 64), dtype=torch.float32):
    return torch.randn(shape_q, dtype=dtype), torch.randn(shape_kv, dtype=dtype), torch.randn(shape_kv, dtype=dtype)


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: (torch.randn(2, 8, 64), *qkv()[1:]), ValueError, "q must have 4 dimensions"),
        (lambda: (qkv()[0], qkv()[1].half(), qkv()[2]), TypeError, "k is torch.float16"),
        (lambda: qkv(dtype=torch.float64), TypeError, "q has dtype torch.float64"),
        (lambda: tuple(t.int() for t in qkv()), TypeError, "dtype"),
        (lambda: qkv((1, 3, 8, 64), (1, 2, 8, 64)), ValueError, r"multiple of key/value heads"),
        (lambda: qkv((1, 2, 8, 64), (1, 2, 8, 32)), ValueError, "head_dim differs"),
        (lambda: qkv((1, 2, 8, 16), (1, 2, 8, 16)), ValueError, "head_dim must be"),
        (lambda: qkv((1, 2, 8, 260), (1, 2, 8, 260)), ValueError, "head_dim must be"),
        (lambda: qkv((1, 2, 8, 60), (1, 2, 8, 60)), ValueError, "head_dim must be"),
        (lambda: qkv((1, 2, 0, 64), (1, 2, 8, 64)), ValueError, "q has a zero-size"),
        (lambda: qkv((2, 2, 8, 64), (1, 2, 8, 64)), ValueError, "batch sizes differ"),
        (lambda: (qkv()[0], qkv()[1], torch.randn(1, 2, 9, 64)), ValueError, "k and v must have the same shape"),
        (lambda: ("q", *qkv()[1:]), TypeError, "q must be a torch.Tensor"),
    ],
)
def test_bad_inputs(make, exc, match):
    q, k, v = make()
    with pytest.raises(exc, match=match):
        tvm_flash.attention(q, k, v)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -0.5, 0.0])
def test_bad_scale(scale):
    with pytest.raises(ValueError, match="scale must be a positive"):
        tvm_flash.attention(*qkv(), scale=scale)


def test_cuda_grid_limit_named():
    """Batch or query heads past CUDA's gridDim.y/z limit (65535) get a clear error, not a launch
    failure (checked on shapes: building such tensors needs no GPU here)."""
    from tvm_flash.ops import _check_cuda_grid

    _check_cuda_grid(65535, 65535)
    with pytest.raises(ValueError, match="batch = 70000 exceeds the CUDA grid limit"):
        _check_cuda_grid(70000, 1)
    with pytest.raises(ValueError, match="query heads = 65536 exceeds"):
        _check_cuda_grid(1, 65536)


def test_meta_device_rejected():
    q, k, v = (t.to("meta") for t in qkv())
    with pytest.raises(ValueError, match="device"):
        tvm_flash.attention(q, k, v)


def test_backward_on_unknown_device_raises_clear_error():
    from tvm_flash.ops import _backward_kernels
    from tvm_flash.workload import Workload

    with pytest.raises(NotImplementedError, match="no backward kernel for device type 'mps'"):
        _backward_kernels("mps", 0, Workload(64, "float16", False))


def test_sdpa_compat_rejects_mask_dropout_and_implicit_gqa():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="attn_mask"):
        tvm_flash.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="dropout"):
        tvm_flash.scaled_dot_product_attention(q, k, v, dropout_p=0.1)
    q, k, v = qkv((1, 4, 8, 64), (1, 2, 8, 64))
    with pytest.raises(ValueError, match="enable_gqa"):
        tvm_flash.scaled_dot_product_attention(q, k, v)
