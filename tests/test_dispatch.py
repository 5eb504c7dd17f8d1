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
