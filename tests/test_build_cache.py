"""The on-disk kernel cache: reuse in a new process without compiling, safe
concurrent builds, damaged entries rebuilt; and CUDA code generation for sm_90
checked by nvcc (runs on CPU machines too)."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    import tvm_flash, tvm_flash.build as build
    if sys.argv[1] == "forbid-compile":
        def refuse(*a, **k):
            raise AssertionError("compiled although the kernel was cached")
        build.compile_kernel = refuse
    device = sys.argv[2]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 70, 64, generator=g).to(device) for _ in range(3))
    t0 = time.perf_counter()
    out = tvm_flash.attention(q, k, v, causal=True)
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (out - ref).abs().max().item() < 1e-4
    print(f"first call {elapsed:.3f} s")
    """
)


def run(args, cache, device="cpu"):
    env = {**os.environ, "TVM_FLASH_CACHE": str(cache), "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-c", SCRIPT, args, device], env=env, capture_output=True, text=True, timeout=600)


def so_files(cache):
    return sorted(p.name for p in Path(cache).iterdir())


def check_reuse(tmp_path, device):
    first = run("allow-compile", tmp_path, device)
    assert first.returncode == 0, first.stderr
    second = run("forbid-compile", tmp_path, device)
    assert second.returncode == 0, second.stderr
    print(f"{device}: building process {first.stdout.strip()}, cached process {second.stdout.strip()}")


def test_second_process_reuses_cached_kernel(tmp_path):
    check_reuse(tmp_path, "cpu")


def test_concurrent_builds_do_not_corrupt_cache(tmp_path):
    env = {**os.environ, "TVM_FLASH_CACHE": str(tmp_path), "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, "allow-compile", "cpu"], env=env, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read()
    files = so_files(tmp_path)
    assert len(files) == 1 and files[0].endswith(".so") and not files[0].startswith("."), files
    assert run("forbid-compile", tmp_path).returncode == 0


def test_damaged_cache_entry_is_rebuilt(tmp_path):
    assert run("allow-compile", tmp_path).returncode == 0
    (entry,) = Path(tmp_path).iterdir()
    entry.write_bytes(b"not a shared library")
    again = run("allow-compile", tmp_path)
    assert again.returncode == 0, again.stderr
    assert "rebuilding" in again.stderr


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("d,dtype,causal", [(64, "float16", True), (128, "bfloat16", False), (256, "float32", True), (80, "float32", False)])
def test_cuda_codegen_compiles_for_sm90(tmp_path, d, dtype, causal):
    from tvm_flash.build import Workload, compile_kernel, make_target

    lib = compile_kernel(Workload(d, dtype, causal), make_target("cuda", "sm_90"))
    src = lib.mod.imports[0].inspect_source()
    assert "__global__" in src and "__syncthreads" in src
    cu = tmp_path / "k.cu"
    cu.write_text(src)
    res = subprocess.run(["nvcc", "-arch=sm_90", "-cubin", "-o", str(tmp_path / "k.cubin"), str(cu), "-Xptxas", "-v"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "Used" in res.stderr and "registers" in res.stderr, res.stderr
