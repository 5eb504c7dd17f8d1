"""``tvm-flash export`` and ``tvm_flash.load``: exported kernels run in a process that
never imports the TVM compiler (CPU here; CUDA too when a GPU is present)."""

import json
import shutil
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import tvm_flash

ROOT = Path(__file__).resolve().parents[1]

# Loads an export folder, runs attention for every exported workload, checks it against
# the float64 reference, and reports which TVM libraries the process holds.
CHILD = textwrap.dedent(
    """
    import json, os, sys, torch
    import tvm_flash
    from tvm_flash.reference import attention_ref
    sys.modules["tvm_flash.build"] = None  # building is impossible: every kernel must come from the export
    folder, device = sys.argv[1], sys.argv[2]
    loaded = tvm_flash.load(folder) if folder != "-" else []
    manifest = json.load(open(os.path.join(os.environ.get("TVM_FLASH_KERNELS", folder), "manifest.json")))
    worst = 0.0
    g = torch.Generator().manual_seed(3)
    for e in manifest["kernels"]:
        dtype = getattr(torch, e["dtype"])
        q = torch.randn(2, 4, 97, e["head_dim"], generator=g)
        k, v = (torch.randn(2, 2, 131, e["head_dim"], generator=g) for _ in range(2))
        q, k, v = (t.to(device, dtype) for t in (q, k, v))
        out = tvm_flash.attention(q, k, v, causal=e["causal"])
        ref, _ = attention_ref(q, k, v, causal=e["causal"])
        err = (out.double().cpu() - ref).abs().max().item()
        if dtype == torch.float32:
            bound = 1e-5
        else:  # 2x the error of torch's own attention in this dtype
            sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=e["causal"], enable_gqa=True)
            bound = 2 * (sdpa.double().cpu() - ref).abs().max().item() + 1e-6
        assert err <= bound, (e["name"], err, bound)
        worst = max(worst, err)
    maps = open("/proc/self/maps").read()
    print("RESULT", json.dumps({
        "loaded": len(loaded), "kernels": len(manifest["kernels"]), "worst": worst,
        "tvm_imported": "tvm" in sys.modules,
        "compiler_lib": "libtvm_compiler" in maps,
        "runtime_lib": "libtvm_runtime.so" in maps,
    }))
    """
)


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _clean_env(**extra):
    """This environment without the user's tvm_flash settings (logs, exports), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_FLASH_TUNING_LOGS", "TVM_FLASH_KERNELS")}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    return {**env, **extra}


def _export(out, *args):
    env = _clean_env()
    cmd = [sys.executable, "-m", "tvm_flash", "export", "--out", str(out), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _child(folder, device, env_extra=None):
    env = _clean_env(**(env_extra or {}))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(folder), device], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT", 1)[1])


def _check_export_runs_without_compiler(tmp_path, device, export_args):
    out = tmp_path / "exported"
    text = _export(out, *export_args)
    manifest = json.loads((out / "manifest.json").read_text())
    assert all((out / e["library"]).is_file() for e in manifest["kernels"])
    for path in [out / "manifest.json", *(out / e["library"] for e in manifest["kernels"])]:
        assert path.stat().st_mode & 0o666 == 0o666 & ~_umask(), f"{path} has mode {oct(path.stat().st_mode)}"
    assert "tvm_flash.load(" in text
    for via_env in (False, True):
        if via_env:
            result = _child("-", device, {"TVM_FLASH_KERNELS": str(out)})
        else:
            result = _child(out, device)
            assert result["loaded"] == result["kernels"] == len(manifest["kernels"])
        assert not result["tvm_imported"], "the tvm package was imported"
        assert not result["compiler_lib"], "libtvm_compiler was loaded"
        assert result["runtime_lib"]
    return manifest


def test_export_and_load_without_compiler_cpu(tmp_path):
    manifest = _check_export_runs_without_compiler(
        tmp_path, "cpu", ["--target", "llvm", "--head-dim", "32", "64", "--dtype", "fp32", "bf16", "--causal", "both"]
    )
    assert [e["name"] for e in manifest["kernels"]] == [
        "fwd_float32_d32", "fwd_float32_d32_causal", "fwd_float32_d64", "fwd_float32_d64_causal",
        "fwd_bfloat16_d32", "fwd_bfloat16_d32_causal", "fwd_bfloat16_d64", "fwd_bfloat16_d64_causal",
    ]
    assert all(e["knobs"] and e["tuned"] is False for e in manifest["kernels"])  # no llvm logs are shipped
    assert manifest["target_kind"] == "llvm"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_export_and_load_without_compiler_cuda(tmp_path):
    major, minor = torch.cuda.get_device_capability()
    manifest = _check_export_runs_without_compiler(
        tmp_path, "cuda",
        ["--target", "cuda", "--arch", f"sm_{major}{minor}", "--head-dim", "64", "--dtype", "fp16", "bf16", "fp32", "--causal", "yes"],
    )
    assert manifest["arch"] == f"sm_{major}{minor}"


def test_importing_tvm_flash_does_not_import_tvm():
    code = "import sys, tvm_flash; print('tvm' in sys.modules, 'tvm_flash.build' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        tvm_flash.load(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": 99}')
    with pytest.raises(ValueError, match="format 99"):
        tvm_flash.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        tvm_flash.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"format": 1, "target_kind": "llvm", "kernels": [{"name": "x", "library": "gone.so", "head_dim": 64, "dtype": "float32", "causal": False}]}
    ))
    with pytest.raises(FileNotFoundError, match="gone.so"):
        tvm_flash.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 1, "target_kind": "rocm", "kernels": []}))
    with pytest.raises(ValueError, match="target_kind 'rocm'"):
        tvm_flash.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 1, "target_kind": "llvm", "kernels": [{"name": "x"}]}))
    with pytest.raises(ValueError, match="'kernels' must be a list"):
        tvm_flash.load(tmp_path)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_export_groups_compile_with_nvcc(tmp_path):
    """Each library of a CUDA export (one per dtype, every head dim and causal flag in one
    CUDA source) compiles for sm_90: no clashing declarations between its kernels."""
    import tvm

    from tvm_flash.build import Workload, make_target, scheduled_func

    for dtype in ("bfloat16", "float16", "float32"):
        funcs = {}
        for d in (64, 128):
            for causal in (False, True):
                wl = Workload(d, dtype, causal)
                funcs[wl.name] = scheduled_func(wl, "cuda").with_attr("global_symbol", wl.name)
        src = tvm.compile(tvm.IRModule(funcs), target=make_target("cuda", "sm_90")).mod.imports[0].inspect_source()
        cu = tmp_path / f"{dtype}.cu"
        cu.write_text(src)
        res = subprocess.run(["nvcc", "-arch=sm_90", "-cubin", "-o", str(tmp_path / f"{dtype}.cubin"), str(cu)],
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, "\n".join(ln for ln in res.stderr.splitlines() if "error" in ln)


def _has_setuptools(major: int) -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= major


def test_non_editable_install_finds_schedules_and_tuning_logs(tmp_path):
    """A wheel installed outside the source tree carries the schedules and the shipped
    tuning logs, and finds them (run from a folder that is not the repository)."""
    wheel_dir, target, src = tmp_path / "wheel", tmp_path / "site", tmp_path / "src"
    # Build from a copy of the tracked files: no build/ or egg-info lands in the repository,
    # and nothing stale from an earlier build/ can slip into the wheel.
    # (+ untracked files git does not ignore: a checkout whose index lags its files still installs them all)
    tracked = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
    for rel in filter(None, tracked.split("\0")):
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    # Machines without a package index (the GPU box) build with the setuptools they have.
    isolation = ["--no-build-isolation"] if _has_setuptools(69) else []
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", *isolation,
                            "-q", "-w", str(wheel_dir)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = wheel_dir.glob("*.whl")
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                          capture_output=True, text=True, timeout=600)
    assert inst.returncode == 0, inst.stderr[-2000:]
    code = textwrap.dedent(
        """
        import tvm_flash, tvm_flash.tune as tune, tvm_flash.build as build
        from tvm_flash.workload import Workload
        print(tvm_flash.__file__)
        print(len(tune.list_logs()))
        print(build.schedule_module("cuda", Workload(64, "float16", False)).__name__)
        print(tune.tuned_knobs(Workload(128, "bfloat16", True), build.make_target("cuda", "sm_90")) is not None)
        """
    )
    # TVM stays importable where it is not installed in site-packages (the GPU box's /tmp/site)
    import tvm_ffi

    tvm_home = str(Path(tvm_ffi.__file__).resolve().parents[1])
    env = {**_clean_env(), "PYTHONPATH": os.pathsep.join([str(target), tvm_home])}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    where, nlogs, sched, tuned = proc.stdout.split()
    assert where.startswith(str(target))
    shipped = len(list((ROOT / "tuning_logs").glob("*/*/database_tuning_record.json")))
    assert int(nlogs) == shipped >= 8
    assert sched == "tvm_flash.schedules.cuda_tc"
    assert tuned == "True"


def test_bad_kernels_env_fails_every_call_not_just_the_first(tmp_path, monkeypatch):
    """A broken TVM_FLASH_KERNELS folder is an error on every call, never a silent fallback."""
    from tvm_flash import ops, runtime

    monkeypatch.setenv("TVM_FLASH_KERNELS", str(tmp_path / "nowhere"))
    monkeypatch.setattr(runtime, "_env_loaded", False)
    ops._kernel.cache_clear()
    q = torch.randn(1, 1, 8, 32)
    try:
        for _ in range(2):
            with pytest.raises(FileNotFoundError, match="manifest.json"):
                tvm_flash.attention(q, q, q)
    finally:
        ops._kernel.cache_clear()
