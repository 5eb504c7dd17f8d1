"""Which kernel serves a device, without a GPU: Hopper builds for sm_90a (the wgmma kernel),
other archs keep their own; an sm_90 export serves an sm_90a device, other archs do not."""

import pytest
import torch

from tvm_flash import ops, runtime
from tvm_flash.workload import Workload


@pytest.mark.parametrize("cap,arch", [((9, 0), "sm_90a"), ((8, 0), "sm_80"), ((8, 9), "sm_89"), ((10, 0), "sm_100")])
def test_cuda_arch_of_a_device(monkeypatch, cap, arch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    assert ops._cuda_arch(0) == arch


def test_schedule_module_follows_the_target_arch():
    from tvm_flash.build import make_target, schedule_module

    bf16 = Workload(128, "bfloat16", True)
    assert schedule_module(make_target("cuda", "sm_90a"), bf16).__name__.endswith("cuda_wgmma")
    assert schedule_module(make_target("cuda", "sm_90"), bf16).__name__.endswith("cuda_tc")
    assert schedule_module(make_target("cuda", "sm_80"), bf16).__name__.endswith("cuda_tc")
    # head dims the wgmma kernel does not take, and fp32, keep their kernels on sm_90a
    assert schedule_module(make_target("cuda", "sm_90a"), Workload(96, "bfloat16", False)).__name__.endswith("cuda_tc")
    assert schedule_module(make_target("cuda", "sm_90a"), Workload(128, "float32", False)).__name__.endswith("cuda_ffma")


def test_kernel_table_names_the_backward_too():
    """``tvm-flash info`` says which modules run the forward and backward: on Hopper fp16/bf16 at
    head dims 64/128 both on wgmma, fp32 on CUDA cores; elsewhere the mma.sync forward and the
    FFMA backward; the CPU's own kernels on LLVM."""
    from tvm_flash.cli import kernel_table

    hopper = "\n".join(kernel_table("cuda", "sm_90a"))
    assert "bfloat16 head dim 128: cuda_wgmma / cuda_wgmma_bwd" in hopper
    assert "float32  head dim  64: cuda_ffma / cuda_simt" in hopper
    assert "float16  head dim  64: cuda_tc / cuda_simt" in "\n".join(kernel_table("cuda", "sm_80"))
    assert all(line.endswith("cpu / cpu") for line in kernel_table("llvm", None)[1:])


def test_exported_kernel_arch_fallback(monkeypatch):
    wl = Workload(64, "float16", False)
    sentinel = object()
    monkeypatch.setattr(runtime, "_env_loaded", True)
    monkeypatch.setattr(runtime, "_kernels", {("cuda", "sm_90", wl): sentinel})
    assert runtime.exported_kernel("cuda", "sm_90a", wl) is sentinel  # sm_90 code runs on Hopper
    assert runtime.exported_kernel("cuda", "sm_90", wl) is sentinel
    assert runtime.exported_kernel("cuda", "sm_80", wl) is None
    monkeypatch.setattr(runtime, "_kernels", {("cuda", "sm_90a", wl): sentinel})
    assert runtime.exported_kernel("cuda", "sm_90", wl) is None  # sm_90a code needs an sm_90a device


@pytest.mark.parametrize("dq_accum", [False, True])
def test_backward_into_runs_the_module_it_is_given(dq_accum):
    """``ops._backward_into`` calls a backward module's kernels in order with the arguments
    their signatures take: the delta pass, then dK/dV and dQ, or (``dq_accum``: the dK/dV kernel
    adds dQ's fp32 partial sums) dK/dV into a zeroed fp32 buffer [B, Hq, ceil(Sq/64), 64*D], then
    its conversion."""
    from tvm_flash.build import BackwardKernels

    calls = []

    def kernel(name):
        def run(*args):
            calls.append((name, args))
            if name == "flash_bwd_prep":
                args[3].fill_(7.0)  # delta
            if name == "flash_bwd_dkdv" and dq_accum:
                # tile-major: one region of 64 * D floats per 64 queries (5 queries: one tile)
                assert args[9].dtype == torch.float32 and args[9].shape == (1, 4, 1, 64 * 64) and not args[9].any()
        return run

    names = ["flash_bwd_prep", "flash_bwd_dkdv", "flash_bwd_dq_convert" if dq_accum else "flash_bwd_dq"]
    kernels = BackwardKernels({n: kernel(n) for n in names}, dict.fromkeys(names))
    assert kernels.dq_accum == dq_accum and len(kernels) == 3
    q, k, v = torch.randn(1, 4, 5, 64), torch.randn(1, 2, 6, 64), torch.randn(1, 2, 6, 64)
    out, dout, lse, dlse = torch.randn_like(q), torch.randn_like(q), torch.randn(1, 4, 5), torch.zeros(1, 4, 5)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    ops._backward_into(kernels, q, k, v, out, dout, lse, dlse, dq, dk, dv, 0.125)
    assert [c[0] for c in calls] == names
    dkdv_args, dq_args = calls[1][1], calls[2][1]
    assert dkdv_args[6].eq(7.0).all()  # delta in place of dLSE
    assert dkdv_args[7] is dk and dkdv_args[8] is dv and dkdv_args[-1] == 0.125
    if dq_accum:
        assert len(dkdv_args) == 11 and dq_args[0] is dkdv_args[9] and dq_args[1] is dq and dq_args[2] == 0.125
    else:
        assert len(dkdv_args) == 10 and dq_args[7] is dq and len(dq_args) == 9


def test_backward_asks_for_kernels_without_atomics_under_deterministic_algorithms(monkeypatch):
    """``torch.use_deterministic_algorithms(True)`` reaches the backward's kernel choice (the
    wgmma backward's causal default adds dQ with atomics; ``deterministic_knobs`` turns that off)."""
    import tvm_flash
    from schedules import cuda_wgmma_bwd

    assert cuda_wgmma_bwd.default_knobs_backward(128, True)["dq_accum"] == 1
    assert cuda_wgmma_bwd.default_knobs_backward(128, False)["dq_accum"] == 0
    assert cuda_wgmma_bwd.default_knobs_backward(64, True)["dq_accum"] == 0  # hd64: 128-query steps instead
    funcs = cuda_wgmma_bwd.schedule_backward(128, "bfloat16", True, **cuda_wgmma_bwd.deterministic_knobs(128, True))
    assert "flash_bwd_dq" in funcs and "flash_bwd_dq_convert" not in funcs
    assert cuda_wgmma_bwd.deterministic_knobs(128, False) == {}  # no atomics there: the same module
    seen, real = [], ops._backward_kernels
    monkeypatch.setattr(ops, "_backward_kernels", lambda *a: seen.append(a[3:]) or real(*a))
    q, k, v = (torch.randn(1, 2, 40, 32, requires_grad=True) for _ in range(3))
    for flag in (False, True):
        torch.use_deterministic_algorithms(flag)
        try:
            tvm_flash.attention(q, k, v, causal=True).sum().backward()
        finally:
            torch.use_deterministic_algorithms(False)
    assert seen == [(False,), (True,)]
    # where dq_accum's padded buffer would outgrow 32-bit indexing (q itself fits), no atomics either
    assert ops._dq_acc_fits(4, 16, 4096, 128) and not ops._dq_acc_fits(65, 63, 4097, 128)
    assert 65 * 63 * 4097 * 128 <= 2**31 - 1


def test_key_length_classes(monkeypatch):
    """ops picks a kernel per key-length class: 1024, 2048 or 0 (any length); on a GPU class 1024
    (at hd128 the persistent short kernel) also needs more 128-row query tiles than SMs."""
    from types import SimpleNamespace as NS

    monkeypatch.setattr(ops, "_sm_count", lambda index: 132)

    def t(b, h, s, cuda=True):
        return NS(shape=(b, h, s, 128), is_cuda=cuda, device=NS(index=0))

    q = t(4, 16, 512)  # 256 query tiles
    assert [ops._seq_class(q, t(4, 16, s)) for s in (1, 1024, 1025, 2048, 2049)] == [1024, 1024, 2048, 2048, 0]
    assert ops._seq_class(t(1, 16, 1024), t(1, 16, 1024)) == 2048  # 128 tiles on 132 SMs
    assert ops._seq_class(t(1, 16, 1025), t(1, 16, 1024)) == 1024  # 144 tiles
    assert ops._seq_class(t(1, 1, 64, cuda=False), t(1, 1, 64, cuda=False)) == 1024
