"""MetaSchedule tuning of the kernels' knobs, and lookup of the tuning logs at build time.

Our kernels are generated per knob set (tile sizes, warps, pipeline stages... are
construction-time parameters of the PrimFunc), so MetaSchedule cannot tile them with
schedule primitives.  Instead it searches the knob space as *decisions of a trace*:

- **Workload**: the scheduled function at default knobs, with its symbolic shapes bound to
  one concrete bucket (``BUCKETS``: MetaSchedule allocates the runner's arguments from the
  buffer shapes), ``scale`` bound to 1/sqrt(head_dim), and the attribute
  ``"tvm_flash.workload"`` (JSON of the ``Workload``).  Its structural hash is the record's
  identity: (head dim, dtype, causal, schedule source at default knobs); the folder is the target.
- **Design space** (``ScheduleFn``): ``sample_categorical`` per knob of the schedule module's
  ``KNOB_SPACE``, each decision recorded on the root block as ``tvm_flash.knob.<name>``.  No
  schedule rules or postprocessors; ``MutateKnob`` re-samples one knob of a trace.
- **Builder** (``f_build``): reads the workload attribute and the knob annotations and builds
  the real, shape-generic kernel with ``build.compile_kernel`` (invalid knob combinations raise
  ``ValueError``: a build error, the candidate is skipped).  Exported as a shared library.
- **Runner**: LocalRunner, or RPCRunner through a tracker.  ``alloc_args`` allocates the
  bucket's tensors and appends the float ``scale``; the evaluator calls ``flash_fwd``.  The
  kernel then serves every shape at run time.
- **Cost model**: ``XGBModel`` over ``KnobFeatures``: the knob vector of a candidate plus a bias.
- **Database**: ``JSONDatabase`` in ``<tuning_logs>/<target tag>/<workload name>/`` pruned to
  the best record.  ``tuned_knobs(workload, target)`` replays that record's trace on the
  workload (zero trials) and returns its knobs; ``build.get_kernel`` uses them when no knobs
  are given.  MetaSchedule is only imported when a log exists or when tuning.

The tuning_logs folder: ``$TVM_FLASH_TUNING_LOGS``, else ``tuning_logs/`` of the source tree,
else the installed ``tvm_flash.tuning_logs`` package.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

import tvm

from .build import Workload, host_cpu, make_target, schedule_module

log = logging.getLogger("tvm_flash")

KNOB_PREFIX = "tvm_flash.knob."
WORKLOAD_ATTR = "tvm_flash.workload"
SPACE_ATTR = "tvm_flash.knob_space"
DB_FILES = ("database_workload.json", "database_tuning_record.json")

# Shapes (B, Hq, Hkv, Sq, Sk) the candidates are timed on, per target kind.
MIN_GAIN = 0.01  # a candidate must beat the defaults by 1% (the re-measurement noise is ~0.5%)
BUCKETS = {"cuda": (4, 16, 16, 4096, 4096), "llvm": (1, 2, 2, 256, 256)}


# ----------------------------------------------------------------------------- names and folders


def target_tag(target: tvm.target.Target) -> str:
    """Folder name of a target: "llvm", "cuda-sm_90"."""
    kind = target.kind.name
    if kind == "cuda":
        arch = target.attrs.get("arch", "")
        return f"cuda-{arch}" if arch else "cuda"
    return kind


def workload_name(workload: Workload) -> str:
    return workload.name


def logs_root() -> Path:
    """The tuning_logs folder (env override, source tree, installed package)."""
    env = os.environ.get("TVM_FLASH_TUNING_LOGS")
    if env:
        return Path(env)
    source = Path(__file__).resolve().parent.parent / "tuning_logs"
    if source.is_dir():
        return source
    # Installed: pyproject maps tuning_logs/ to the (namespace) package tvm_flash.tuning_logs.
    return Path(__file__).resolve().parent / "tuning_logs"


def log_dir(workload: Workload, target: tvm.target.Target, root: Path | None = None) -> Path:
    return (root or logs_root()) / target_tag(target) / workload_name(workload)


def list_logs(root: Path | None = None) -> list[tuple[str, str]]:
    """(target tag, workload name) of every tuning log present."""
    root = root or logs_root()
    found = []
    if root.is_dir():
        for rec in sorted(root.glob(f"*/*/{DB_FILES[1]}")):
            found.append((rec.parent.parent.name, rec.parent.name))
    return found


# ----------------------------------------------------------------------------- workload and space


def knob_space(workload: Workload, target) -> dict[str, list[int]]:
    """The knob space of the workload's schedule module on ``target`` (a Target or kind)."""
    return dict(schedule_module(target, workload).KNOB_SPACE)


def workload_mod(workload: Workload, target: tvm.target.Target, bucket: tuple | None = None) -> tvm.IRModule:
    """The IRModule MetaSchedule tunes: a small stand-in for the kernel.

    Its parameters are the kernel's tensors at the bucket's shapes (the runner allocates
    them from these); its attributes name the workload and the knob space (the builder
    builds the real kernel from them).  Its body is a placeholder: the records stay small
    (a few KB) and do not go stale when the kernel's code changes; a knob a newer schedule
    no longer has is caught when the log is applied."""
    from tvm.script import tirx as T

    kind = target.kind.name
    b, hq, hkv, sq, sk = bucket or BUCKETS[kind]
    d, dt = workload.head_dim, workload.dtype

    @T.prim_func(s_tir=True)
    def main(
        q: T.Buffer((b, hq, sq, d), dt),
        k: T.Buffer((b, hkv, sk, d), dt),
        v: T.Buffer((b, hkv, sk, d), dt),
        o: T.Buffer((b, hq, sq, d), dt),
        lse: T.Buffer((b, hq, sq), "float32"),
    ):
        # The attributes MetaSchedule's TuneContext adds (_normalize_mod): the records of
        # tune_tir and ours then share one workload entry (one structural hash).
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        with T.sblock("root"):
            lse[0, 0, 0] = T.float32(0)

    func = main.with_attr(WORKLOAD_ATTR, json.dumps(dataclasses.asdict(workload), sort_keys=True))
    func = func.with_attr(SPACE_ATTR, json.dumps(knob_space(workload, target), sort_keys=True))
    return tvm.IRModule({"main": func})


def _root_block(func):
    return func.body.block


def read_knobs(mod: tvm.IRModule) -> dict[str, int]:
    """The knob annotations of a candidate's root block."""
    ann = _root_block(mod["main"]).annotations
    return {key[len(KNOB_PREFIX):]: int(val) for key, val in ann.items() if key.startswith(KNOB_PREFIX)}


def read_workload(mod: tvm.IRModule) -> Workload:
    return Workload(**json.loads(str(mod["main"].attrs[WORKLOAD_ATTR])))


def make_space_fn(space: dict[str, list[int]], fixed: dict | None = None):
    """The ScheduleFn body: sample every knob, annotate the root block with the decision.
    ``fixed`` pins knobs to given values (a trace of that one knob set)."""

    def sample_knobs(sch) -> None:
        root = sch.get_sblock("root")
        for name, cands in space.items():
            cands = [int(c) for c in cands]
            decision = cands.index(int(fixed[name])) if fixed and name in fixed else None
            rv = sch.sample_categorical(candidates=cands, probs=[1.0 / len(cands)] * len(cands), decision=decision)
            sch.annotate(root, KNOB_PREFIX + name, rv)

    return sample_knobs


# ----------------------------------------------------------------------------- builder and runner (worker side)


def f_build(mod: tvm.IRModule, target: tvm.target.Target, _params=None):
    """LocalBuilder worker: the real kernel for the candidate's knobs (no tensor intrinsics)."""
    from .build import compile_kernel

    return compile_kernel(read_workload(mod), target, read_knobs(mod))


def f_export(lib) -> str:
    path = os.path.join(tempfile.mkdtemp(prefix="tvm_flash_tune_"), "flash_fwd.so")
    lib.export_library(path)
    return path


def _scale(args_info) -> float:
    return 1.0 / math.sqrt(args_info[0][2][-1])


def alloc_args_local(device, args_info, alloc_repeat):
    from tvm.s_tir.meta_schedule.runner.local_runner import default_alloc_argument

    scale = _scale(args_info)
    return [args + [scale] for args in default_alloc_argument(device, args_info, alloc_repeat)]


def alloc_args_rpc(session, device, args_info, alloc_repeat):
    from tvm.s_tir.meta_schedule.runner.rpc_runner import default_alloc_argument

    scale = _scale(args_info)
    return [args + [scale] for args in default_alloc_argument(session, device, args_info, alloc_repeat)]


def run_local(rt_mod, device, config, repeated_args):
    evaluator = rt_mod.time_evaluator(
        "flash_fwd", device, number=config.number, repeat=config.repeat, min_repeat_ms=config.min_repeat_ms
    )
    costs = []
    for args in repeated_args:
        device.sync()
        costs.extend(float(c) for c in evaluator(*args).results)
    return costs


def run_rpc(_session, rt_mod, device, config, repeated_args):
    return run_local(rt_mod, device, config, repeated_args)


# ----------------------------------------------------------------------------- search pieces (tuning side)


@functools.lru_cache(maxsize=None)
def _ms_classes():
    """MetaSchedule subclasses, defined on first use so that importing this module stays cheap."""
    import numpy as np
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class KnobFeatures(ms.feature_extractor.PyFeatureExtractor):
        """One feature row per candidate: its knob values (in annotation order) and a bias 1."""

        def extract_from(self, context, candidates):
            out = []
            for cand in candidates:
                knobs = read_knobs(cand.sch.mod)
                row = [float(knobs[k]) for k in sorted(knobs)] + [1.0]
                out.append(tvm.runtime.tensor(np.array([row], dtype="float32")))
            return out

    @derived_object
    class MutateKnob(ms.mutator.PyMutator):
        """Re-sample one ``sample_categorical`` decision of a trace (a different candidate)."""

        def __init__(self, seed: int = 0):
            import random

            self._rng = random.Random(seed)

        def _initialize_with_tune_context(self, context) -> None:
            pass

        def apply(self, trace, _rand_state):
            insts = [i for i in trace.insts if i.kind.name == "SampleCategorical"]
            if not insts:
                return None
            inst = self._rng.choice(insts)
            n = len(inst.attrs[0])
            if n < 2:
                return None
            old = int(trace.decisions[inst])
            new = self._rng.choice([c for c in range(n) if c != old])
            return trace.with_decision(inst, new, remove_postproc=True)

        def clone(self):
            return MutateKnob(self._rng.randrange(1 << 30))

    @derived_object
    class Progress(ms.measure_callback.PyMeasureCallback):
        """Prints trials done, failures, the best time and TFLOP/s so far, and an ETA."""

        def __init__(self, total: int, echo, flops: float, best: float | None = None, best_knobs=None):
            self.total, self.echo, self.done, self.flops = total, echo, 0, flops
            self.best, self.best_knobs, self.t0 = best, best_knobs, time.perf_counter()

        def apply(self, task_scheduler, task_id, candidates, builder_results, runner_results):
            failed, why = 0, ""
            for cand, b, r in zip(candidates, builder_results, runner_results):
                self.done += 1
                if b.error_msg or r.error_msg or not r.run_secs:
                    failed += 1
                    why = why or f" (first: {'build' if b.error_msg else 'run'}: {error_line(b.error_msg or r.error_msg)})"
                    continue
                secs = sum(float(s) for s in r.run_secs) / len(r.run_secs)
                if self.best is None or secs < self.best:
                    self.best, self.best_knobs = secs, read_knobs(cand.sch.mod)
            best = (
                f"{self.best * 1e3:.3f} ms = {self.flops / self.best / 1e12:.3g} TFLOP/s {self.best_knobs}"
                if self.best is not None else "none yet"
            )
            spent = time.perf_counter() - self.t0
            eta = spent / self.done * max(0, self.total - self.done)
            self.echo(
                f"[tune] {self.done}/{self.total} trials ({failed} failed in this batch{why}), "
                f"best {best}, {spent:.0f} s, ETA {eta:.0f} s"
            )

    @derived_object
    class KnobCheck(ms.postproc.PyPostproc):
        """Rejects knob sets the schedule cannot build (its cheap ``check_knobs``) before they
        are built or counted as trials: the search only proposes valid candidates."""

        def _initialize_with_tune_context(self, context) -> None:
            pass

        def apply(self, sch) -> bool:
            return knobs_valid(read_workload(sch.mod), self.target, read_knobs(sch.mod))

        def clone(self):
            twin = KnobCheck()
            twin.target = self.target
            return twin

    return KnobFeatures, MutateKnob, Progress, KnobCheck


# ----------------------------------------------------------------------------- tuning


def tune_target(kind: str, arch: str | None = None) -> tvm.target.Target:
    """The target to tune for (MetaSchedule wants num-cores on llvm)."""
    if kind == "llvm":
        import psutil

        return tvm.target.Target({"kind": "llvm", "num-cores": psutil.cpu_count(logical=False) or 1,
                                  "mcpu": host_cpu()})  # as built at first use
    return make_target(kind, arch)


def bucket_flops(workload: Workload, bucket: tuple) -> float:
    b, hq, _, sq, sk = bucket
    return 4.0 * b * hq * sq * sk * workload.head_dim / (2 if workload.causal else 1)


def tune(
    workload: Workload,
    target: tvm.target.Target,
    trials: int = 32,
    *,
    trials_per_iter: int | None = None,
    gqa: int = 1,
    rpc_tracker: str | None = None,
    rpc_key: str | None = None,
    root: Path | None = None,
    space: dict[str, list[int]] | None = None,
    seed: int = 1,
    min_gain: float = MIN_GAIN,
    echo=print,
) -> dict:
    """Tune the knobs of a workload; write the pruned log; return the best knobs.

    The schedule's default knobs are measured first and stay in the database, so the log
    never holds a knob set slower than the defaults on the bucket.  ``gqa`` times the
    candidates with that many query heads per key/value head (the log serves every group
    size: the kernel is the same).  ``space`` narrows the schedule module's ``KNOB_SPACE``
    (knobs left out keep their defaults).  A candidate replaces the defaults only when it is
    faster by more than ``min_gain`` (a fraction): a win inside the measurement noise at one
    bucket is no reason to leave the hand-picked knobs for all lengths."""
    from tvm.s_tir import meta_schedule as ms

    KnobFeatures, MutateKnob, Progress, KnobCheck = _ms_classes()
    kind = target.kind.name
    b, hq, _, sq, sk = BUCKETS[kind]
    if gqa < 1 or hq % gqa:
        raise ValueError(f"--gqa must divide the bucket's {hq} query heads, got {gqa}")
    bucket = (b, hq, hq // gqa, sq, sk)
    mod = workload_mod(workload, target, bucket)
    space = space or knob_space(workload, target)
    ncand = math.prod(len(c) for c in space.values())
    nvalid = sum(knobs_valid(workload, target, dict(zip(space, combo))) for combo in itertools.product(*space.values()))
    if nvalid == 0:
        raise ValueError(f"no knob set of {space} is valid for {workload_name(workload)}")
    trials = min(trials, nvalid)
    per_iter = min(trials_per_iter or trials, trials)
    if kind == "cuda":
        evaluator = ms.runner.EvaluatorConfig(number=10, repeat=3, min_repeat_ms=50, enable_cpu_cache_flush=False)
    else:
        evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=0, enable_cpu_cache_flush=False)
    if rpc_tracker:
        host, port = rpc_tracker.rsplit(":", 1)
        config = ms.runner.RPCConfig(tracker_host=host, tracker_port=int(port), tracker_key=rpc_key, session_timeout_sec=120)
        runner = ms.runner.RPCRunner(
            config, evaluator, f_alloc_argument=alloc_args_rpc, f_run_evaluator=run_rpc, max_workers=1
        )
    else:
        runner = ms.runner.LocalRunner(
            timeout_sec=120, evaluator_config=evaluator, f_alloc_argument=alloc_args_local, f_run_evaluator=run_local
        )
    builder = ms.builder.LocalBuilder(
        f_build=f_build, f_export=f_export, timeout_sec=300, max_workers=max(1, min(16, os.cpu_count() or 1))
    )
    strategy = ms.search_strategy.EvolutionarySearch(
        population_size=max(16, 2 * per_iter), init_measured_ratio=0.0, init_min_unmeasured=max(8, per_iter),
        genetic_num_iters=2,
    )
    flops = bucket_flops(workload, bucket)
    knob_check = KnobCheck()
    knob_check.target = target
    echo(f"[tune] {workload_name(workload)} on {target_tag(target)}, bucket B,Hq,Hkv,Sq,Sk={bucket}: "
         f"{trials} trials over {nvalid} valid of {ncand} knob sets {space}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tvm_flash_tune_") as work_dir, _no_tensor_intrinsics():
        db = ms.database.JSONDatabase(work_dir=work_dir)
        default_secs, default_rec = _measure_defaults(db, mod, target, space, builder, runner, echo)
        default_knobs = _knobs_in_space(workload, target, space)
        progress = Progress(trials, echo, flops, default_secs, default_knobs if default_secs else None)
        ms.tune_tir(
            mod,
            target,
            work_dir,
            max_trials_global=trials,
            num_trials_per_iter=per_iter,
            space=ms.space_generator.ScheduleFn(
                make_space_fn(space), sch_rules=[], postprocs=[knob_check], mutator_probs={MutateKnob(seed): 1.0}
            ),
            builder=builder,
            runner=runner,
            database=db,
            cost_model=ms.cost_model.XGBModel(extractor=KnobFeatures(), num_warmup_samples=0, adaptive_training=False),
            measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), progress],
            strategy=strategy,
            num_tuning_cores=1,
            seed=seed,
        )
        best = _best_record(db, workload)
        if best is None:
            raise RuntimeError(f"tuning {workload_name(workload)}: no candidate built and ran successfully")
        if default_rec is not None and _mean(best.run_secs) * (1 + min_gain) > default_secs:
            if _mean(best.run_secs) < default_secs:
                echo(f"[tune] keeping the defaults: the best candidate {_mean(best.run_secs) * 1e3:.3f} ms "
                     f"{_knobs_of(best.trace, mod)} is not {min_gain:.0%} faster")
            best = default_rec
        _write_pruned(best, mod, log_dir(workload, target, root))
    knobs = _knobs_of(best.trace, mod)
    secs = _mean(best.run_secs)
    vs = f" (defaults {default_secs * 1e3:.3f} ms: {default_secs / secs:.3f}x)" if default_secs else ""
    echo(f"[tune] best {secs * 1e3:.3f} ms = {flops / secs / 1e12:.3g} TFLOP/s{vs}: {knobs}")
    echo(f"[tune] log: {log_dir(workload, target, root)} ({time.perf_counter() - t0:.0f} s)")
    return knobs


def _best_record(db, workload: Workload):
    """The fastest record of ``workload`` in ``db``, whichever workload entry holds it
    (matched by the workload attribute, not only by structural hash)."""
    mine = [
        r for r in db.get_all_tuning_records()
        if r.run_secs and WORKLOAD_ATTR in (r.workload.mod["main"].attrs or {}) and read_workload(r.workload.mod) == workload
    ]
    return min(mine, key=lambda r: _mean(r.run_secs)) if mine else None


def error_line(text: str | None) -> str:
    """The telling line of a worker's error text (the last one naming an error)."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    named = [ln for ln in lines if "Error" in ln or "error:" in ln]
    return (named or lines or ["unknown error"])[-1][:300]


def knobs_valid(workload: Workload, target, knobs: dict) -> bool:
    """Whether the schedule on ``target`` (a Target or kind) accepts these knobs (``check_knobs``;
    True if it has none)."""
    check = getattr(schedule_module(target, workload), "check_knobs", None)
    if check is None:
        return True
    try:
        check(workload.head_dim, workload.dtype, workload.causal, knobs)
    except ValueError:
        return False
    return True


def _mean(run_secs) -> float:
    return sum(float(s) for s in run_secs) / len(run_secs)


def _knobs_in_space(workload: Workload, target, space: dict) -> dict:
    from .build import effective_knobs

    return {k: int(v) for k, v in effective_knobs(workload, target, None).items() if k in space}


def _measure_defaults(db, mod, target, space, builder, runner, echo):
    """Build and time the schedule's default knobs; commit the record to ``db``.
    Returns (mean seconds, record), or (None, None) when they cannot be measured."""
    from tvm.s_tir import meta_schedule as ms

    knobs = _knobs_in_space(read_workload(mod), target, space)
    if any(int(knobs[k]) not in [int(c) for c in space[k]] for k in knobs):
        return None, None  # the defaults are outside a narrowed space
    sch = tvm.s_tir.Schedule(mod)
    make_space_fn(space, knobs)(sch)
    args_info = ms.arg_info.ArgInfo.from_prim_func(mod["main"])
    (built,) = builder.build([ms.builder.BuilderInput(sch.mod, target)])
    if built.error_msg:
        echo(f"[tune] the default knobs failed to build: {error_line(built.error_msg)}")
        return None, None
    device = "cpu" if target.kind.name == "llvm" else target.kind.name
    try:
        (future,) = runner.run([ms.runner.RunnerInput(built.artifact_path, device, args_info)])
        result = future.result()
    finally:
        shutil.rmtree(os.path.dirname(built.artifact_path), ignore_errors=True)
    if result.error_msg or not result.run_secs:
        echo(f"[tune] the default knobs failed to run: {error_line(result.error_msg or 'no times')}")
        return None, None
    secs = _mean(result.run_secs)
    wl = db.commit_workload(mod)
    record = ms.database.TuningRecord(sch.trace, wl, [float(s) for s in result.run_secs], target, args_info)
    db.commit_tuning_record(record)
    echo(f"[tune] defaults {knobs}: {secs * 1e3:.3f} ms")
    return secs, record


@contextlib.contextmanager
def _no_tensor_intrinsics():
    """``TuneContext`` imports ``tvm.s_tir.tensor_intrin`` (parses ~250 intrinsics: 25-90 s).
    Our space uses none, so a stub stands in for it while tuning (unless it is loaded already)."""
    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        yield
        return
    sys.modules[name] = types.ModuleType(name)
    try:
        yield
    finally:
        sys.modules.pop(name, None)


def _write_pruned(record, mod: tvm.IRModule, folder: Path) -> None:
    """A fresh JSONDatabase holding only ``record``, moved into ``folder`` file by file."""
    from tvm.s_tir import meta_schedule as ms

    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".tmp_") as tmp:
        db = ms.database.JSONDatabase(work_dir=tmp)
        wl = db.commit_workload(mod)
        db.commit_tuning_record(ms.database.TuningRecord(record.trace, wl, record.run_secs, record.target, record.args_info))
        for name in DB_FILES:
            os.replace(os.path.join(tmp, name), folder / name)


def _knobs_of(trace, mod: tvm.IRModule) -> dict[str, int]:
    sch = tvm.s_tir.Schedule(mod)
    trace.apply_to_schedule(sch, remove_postproc=True)
    return read_knobs(sch.mod)


# ----------------------------------------------------------------------------- lookup (build side)


def tuned_knobs(workload: Workload, target: tvm.target.Target, root: Path | None = None) -> dict | None:
    """Knobs of the best tuning record of a workload on a target, or None (defaults apply).

    Never raises on a missing, corrupt or stale log: it logs why (naming the file) and
    returns None."""
    folder = log_dir(workload, target, root)
    rec_path = folder / DB_FILES[1]
    if not rec_path.is_file():
        log.info("tvm_flash: no tuning log for %s on %s (%s); using default knobs", workload_name(workload), target_tag(target), folder)
        return None
    for name in DB_FILES:
        path = folder / name
        try:
            with open(path) as f:
                for line in f:
                    if line.strip():
                        json.loads(line)
        except (OSError, ValueError) as err:
            log.warning("tvm_flash: tuning log %s is unreadable (%s); using default knobs", path, err)
            return None
    try:
        from tvm.s_tir import meta_schedule as ms

        db = ms.database.JSONDatabase(work_dir=str(folder), allow_missing=False)
        record = _best_record(db, workload)
        if record is None:
            log.warning("tvm_flash: tuning log %s has no record for %s; using default knobs", rec_path, workload_name(workload))
            return None
        knobs = _knobs_of(record.trace, record.workload.mod)
        space = knob_space(workload, target)
        stale = {k: v for k, v in knobs.items() if k not in space or v not in space[k]}
        if stale or not knobs:
            raise ValueError(f"knobs {stale or '(none)'} are not in the schedule's knob space (a log from other kernel code?)")
        if not knobs_valid(workload, target, knobs):
            raise ValueError(f"knobs {knobs} are rejected by the schedule's check_knobs (a log from other kernel code?)")
    except Exception as err:  # noqa: BLE001 - a bad log must never break attention
        log.warning("tvm_flash: tuning log %s could not be applied (%s: %s); using default knobs", rec_path, type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        return None
    log.info("tvm_flash: tuned knobs for %s on %s: %s", workload_name(workload), target_tag(target), knobs)
    return knobs
