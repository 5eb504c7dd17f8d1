"""MetaSchedule knob tuning (CPU, LLVM): tune, re-apply the log in a new process, bad logs, RPC.

Every test writes its tuning logs and kernel cache into tmp folders
(``TVM_FLASH_TUNING_LOGS``, ``TVM_FLASH_CACHE``), never into the repository.
"""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from tvm_flash import tune
from tvm_flash.build import Workload, cache_key, get_kernel, make_target
from tvm_flash.reference import attention_ref

WL = Workload(32, "float32", False)
# Every knob set of this sub-space builds (block_m <= num_threads), so no tiny tune comes back
# empty; it holds the CPU defaults (64, 64, 64).
VALID = {"block_m": [32, 64], "block_n": [16, 32, 64], "num_threads": [64]}


@pytest.fixture
def logs(tmp_path, monkeypatch):
    root = tmp_path / "tuning_logs"
    monkeypatch.setenv("TVM_FLASH_TUNING_LOGS", str(root))
    monkeypatch.setenv("TVM_FLASH_CACHE", str(tmp_path / "cache"))
    return root


def _check_kernel(kernel, causal=False):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 77, 32, generator=g) for _ in range(3))
    out, lse = torch.empty_like(q), torch.empty(1, 2, 77)
    kernel(q, k, v, out, lse, 32**-0.5)
    ref, _ = attention_ref(q, k, v, causal=causal)
    assert (out.double() - ref).abs().max().item() <= 1e-5


CHILD = textwrap.dedent(
    """
    import json, logging, sys, torch
    logging.basicConfig(level=logging.INFO)
    import tvm_flash
    from tvm_flash import tune
    from tvm_flash.build import Workload, cache_dir, cache_key, make_target
    from tvm_flash.reference import attention_ref
    wl, target = Workload(32, "float32", False), make_target("llvm", "host")  # what attention builds for
    knobs = tune.tuned_knobs(wl, target)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 100, 32, generator=g) for _ in range(3))
    out = tvm_flash.attention(q, k, v)
    err = (out.double() - attention_ref(q, k, v, causal=False)[0]).abs().max().item()
    built = (cache_dir() / (cache_key(wl, target, knobs) + ".so")).exists()
    print("RESULT", json.dumps({"knobs": knobs, "err": err, "built_with_knobs": built}))
    """
)


def test_tune_then_reapply_in_new_process(logs):
    target = tune.tune_target("llvm")
    best = tune.tune(WL, target, trials=4, space=VALID)
    folder = logs / "llvm" / "fwd_float32_d32"
    assert (folder / "database_tuning_record.json").is_file()
    records = (folder / "database_tuning_record.json").read_text().strip().splitlines()
    assert len(records) == 1  # pruned to the best record
    size = sum((folder / name).stat().st_size for name in tune.DB_FILES)
    assert size < 64_000, f"log is {size} bytes: the records must stay small (the tree travels to the GPU box)"
    assert tune.list_logs() == [("llvm", "fwd_float32_d32")]

    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120, env=os.environ)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert result["knobs"] == best  # the knobs came from the log ...
    assert result["built_with_knobs"]  # ... and attention was built with them
    assert result["err"] <= 1e-5
    assert "tuned knobs for fwd_float32_d32 on llvm" in proc.stderr


def test_no_log_means_defaults(logs, caplog):
    with caplog.at_level(logging.INFO, logger="tvm_flash"):
        assert tune.tuned_knobs(WL, make_target("llvm")) is None
    assert "no tuning log for fwd_float32_d32 on llvm" in caplog.text


def test_corrupt_log_falls_back_to_defaults(logs, caplog):
    folder = logs / "llvm" / "fwd_float32_d32"
    folder.mkdir(parents=True)
    (folder / "database_workload.json").write_text("")
    bad = folder / "database_tuning_record.json"
    bad.write_text('[0, ["not a trace"\n')
    target = make_target("llvm")
    with caplog.at_level(logging.WARNING, logger="tvm_flash"):
        assert tune.tuned_knobs(WL, target) is None
        kernel = get_kernel(WL, target)
    assert str(bad) in caplog.text and "using default knobs" in caplog.text
    _check_kernel(kernel)

    # Valid JSON that is no MetaSchedule record: also a warning naming the file, not an error.
    bad.write_text('[0, ["nonsense"], 1]\n')
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tvm_flash"):
        assert tune.tuned_knobs(WL, target) is None
    assert str(bad) in caplog.text


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(*args):
    # A session of its own: the server forks workers, all stopped together by killpg.
    return subprocess.Popen([sys.executable, "-m", *args], start_new_session=True)


def _stop(proc):
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def test_tune_through_rpc_tracker(logs):
    port, server_port, key = _free_port(), _free_port(), "tvm_flash_test"
    procs = []
    try:
        procs.append(_start("tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1)))
        time.sleep(1)
        procs.append(
            _start(
                "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(server_port), "--port-end", str(server_port + 1),
                "--tracker", f"127.0.0.1:{port}", "--key", key,
            )
        )
        import tvm.rpc

        deadline = time.time() + 30
        while True:
            try:
                if key in tvm.rpc.connect_tracker("127.0.0.1", port).text_summary():
                    break
            except (RuntimeError, OSError):
                pass
            assert time.time() < deadline, "the RPC server did not register with the tracker"
            time.sleep(0.5)
        best = tune.tune(WL, tune.tune_target("llvm"), trials=2, rpc_tracker=f"127.0.0.1:{port}", rpc_key=key, space=VALID)
        assert tune.tuned_knobs(WL, make_target("llvm")) == best
    finally:
        for p in reversed(procs):
            _stop(p)


def test_cli_rejects_bad_gqa(logs):
    from tvm_flash.cli import main

    assert main(["tune", "--target", "llvm", "--head-dim", "32", "--gqa", "3", "--trials", "1"]) == 2


def test_tuning_builder_builds_cuda_candidates():
    """The tuning builder turns a CUDA candidate (knobs as 0/1 annotations) into a kernel:
    CUDA code generation runs on CPU machines too."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    wl, target = Workload(128, "bfloat16", True), make_target("cuda", "sm_90")
    mod = tune.workload_mod(wl, target)
    space = tune.knob_space(wl, "cuda")
    with tune._no_tensor_intrinsics():
        other = {"block_m": 128, "block_n": 32, "num_warps": 8, "num_stages": 3, "one_sync": 0, "lazy_rescale": 1, "smem_epilogue": 0}
        for fixed in (other, tune._knobs_in_space(wl, "cuda", space)):
            assert set(fixed) == set(space)  # every knob pinned: no random decisions
            sch = tvm.s_tir.Schedule(mod)
            tune.make_space_fn(space, fixed)(sch)
            assert tune.read_knobs(sch.mod).items() >= {k: int(v) for k, v in fixed.items()}.items()
            lib = tune.f_build(sch.mod, target)
            assert "mma.sync" in lib.mod.imports[0].inspect_source()


def _ms_of(line):
    return float(line.split("best ", 1)[1].split(" ms", 1)[0])


@pytest.mark.parametrize("space", [VALID, {"block_m": [16, 32], "block_n": [16, 64], "num_threads": [32, 64]}],
                         ids=["defaults-in-space", "defaults-outside"])
def test_log_holds_the_fastest_measured_candidate(logs, space):
    """The written record is the fastest of everything measured: the defaults' record and
    every candidate of the search (they must land in one workload entry)."""
    lines = []
    best = tune.tune(WL, tune.tune_target("llvm"), trials=6, space=space, min_gain=0.0, echo=lines.append)
    progress = [_ms_of(ln) for ln in lines if " trials (" in ln and "best none" not in ln]
    defaults = [float(ln.rsplit(": ", 1)[1].split(" ms")[0]) for ln in lines if ln.startswith("[tune] defaults")]
    final = _ms_of(next(ln for ln in lines if ln.startswith("[tune] best")))
    assert progress, lines
    assert final <= min(progress + defaults) + 0.0015, lines  # printed with 3 decimals
    assert tune.tuned_knobs(WL, make_target("llvm")) == best


def test_defaults_kept_unless_beaten_by_min_gain(logs):
    """With a gain no candidate can reach, the log holds the default knobs, whatever was faster."""
    lines = []
    best = tune.tune(WL, tune.tune_target("llvm"), trials=4, space=VALID, min_gain=100.0, echo=lines.append)
    defaults = {k: int(v) for k, v in tune._knobs_in_space(WL, "llvm", VALID).items()}
    assert {k: int(v) for k, v in best.items()} == defaults, lines
    assert tune.tuned_knobs(WL, make_target("llvm")) == best


def test_invalid_knob_sets_are_never_built(logs):
    """The KnobCheck postprocessor drops knob sets the schedule rejects (block_m > num_threads
    on the CPU, for either CPU kernel) before they are built: no trial is spent on them."""
    lines = []
    tune.tune(WL, tune.tune_target("llvm"), trials=6, echo=lines.append)
    assert "36 valid of 54 knob sets" in lines[0], lines[0]
    batches = [ln for ln in lines if " trials (" in ln]
    assert batches and all("(0 failed in this batch" in ln for ln in batches), batches
