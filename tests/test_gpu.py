"""CUDA checks (skipped without a GPU): accuracy against the float64 reference
at long sequences, GQA, Sq != Sk causal, poisoned outputs, streams,
torch.compile (inductor) and reuse of the cached kernel by a new process."""

import pytest
import torch
from conftest import assert_accurate, gpu, rand_qkv
from test_build_cache import check_reuse

import tvm_flash

pytestmark = [gpu, pytest.mark.gpu]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("s", [128, 1000, 4096])
def test_accuracy_square(dtype, d, causal, s):
    q, k, v = rand_qkv(1, 2, 2, s, s, d, dtype, "cuda", seed=s + d)
    assert_accurate(q, k, v, causal)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gqa_32_q_heads_8_kv_heads(dtype):
    q, k, v = rand_qkv(2, 32, 8, 300, 300, 128, dtype, "cuda", seed=11)
    assert_accurate(q, k, v, causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sq,sk", [(1, 1), (1, 777), (777, 1), (300, 1000), (1000, 300), (129, 65)])
def test_sq_ne_sk_causal(dtype, sq, sk):
    q, k, v = rand_qkv(2, 4, 2, sq, sk, 64, dtype, "cuda", seed=sq + sk)
    assert_accurate(q, k, v, causal=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d", [32, 80, 96, 256])
def test_other_head_dims(d, dtype):
    q, k, v = rand_qkv(1, 2, 1, 200, 150, d, dtype, "cuda", seed=d)
    assert_accurate(q, k, v, causal=True)


def test_runs_on_current_stream():
    q, k, v = rand_qkv(4, 8, 8, 1024, 1024, 64, torch.float16, "cuda", seed=12)
    expected = tvm_flash.attention(q, k, v)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = tvm_flash.attention(q, k, v)
        total = out.float().sum()  # queued behind the kernel on the same stream
    torch.cuda.synchronize()
    assert torch.equal(out, expected) and torch.isfinite(total)


def test_torch_compile_inductor():
    def block(q, k, v):
        return tvm_flash.attention(q * 2, k, v, causal=True).float().relu().sum(-1)

    q, k, v = rand_qkv(2, 4, 4, 256, 256, 64, torch.bfloat16, "cuda", seed=13)
    compiled = torch.compile(block, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), block(q, k, v), atol=1e-2, rtol=1e-2)


def test_no_device_memory_leak():
    q, k, v = rand_qkv(2, 4, 4, 512, 512, 64, torch.float16, "cuda", seed=14)
    tvm_flash.attention(q, k, v)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(100):
        tvm_flash.attention(q, k, v)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before


def test_second_process_reuses_cached_cuda_kernel(tmp_path):
    check_reuse(tmp_path, "cuda")
