"""Build a kernel for a workload and target, export it, cache it on disk, load it.

``get_kernel(workload, target)`` returns a callable PackedFunc
``flash_fwd(q, k, v, o, lse, scale)``.  Lookup order:

1. this process's memory;
2. the disk cache: ``<cache>/<key>.so`` where the key hashes the workload,
   the target, the TVM version and the source of the compute and schedule
   modules (so editing a kernel invalidates its entries);
3. otherwise compile with ``tvm.compile``, ``export_library`` to a temporary
   file in the cache folder and ``os.replace`` it into place: concurrent
   processes building the same kernel never see a half-written file.

The cache folder is ``$TVM_FLASH_CACHE`` or ``~/.cache/tvm_flash``.

``export(workloads, target, folder)`` (``tvm-flash export``) builds several
workloads into libraries (one per dtype) plus a manifest that ``tvm_flash.load`` (``runtime``)
opens without the TVM compiler.

Without explicit knobs the kernel uses the workload's tuning log (``tvm_flash.tune``),
else the schedule's default knobs; the knobs are part of the cache key.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import inspect
import json
import logging
import os
import tempfile
import threading
from pathlib import Path

import tvm

from . import __version__, _mount_source_schedules, compute
from .workload import Workload

__all__ = ["Workload", "cache_dir", "compile_kernel", "export", "get_kernel", "make_target"]

log = logging.getLogger("tvm_flash")
_mount_source_schedules()


def host_cpu() -> str:
    """This machine's CPU as LLVM names it (e.g. "znver4"): the ``mcpu`` of builds made here."""
    return tvm.target.codegen.llvm_get_system_cpu()


def make_target(kind: str, arch: str | None = None) -> tvm.target.Target:
    """The TVM target for "llvm" or "cuda" (``arch``: a CUDA arch like "sm_90", or for "llvm" a
    CPU like "znver4" or "host" for this machine's; none: generic x86-64, portable)."""
    if kind == "llvm":
        if arch == "host":
            arch = host_cpu()
        return tvm.target.Target({"kind": "llvm", **({"mcpu": arch} if arch else {})})
    if kind == "cuda":
        return tvm.target.Target({"kind": "cuda", "arch": arch or "sm_90", "max_shared_memory_per_block": 232448})
    raise ValueError(f"unsupported target kind {kind!r}")


def cache_dir() -> Path:
    return Path(os.environ.get("TVM_FLASH_CACHE") or Path.home() / ".cache" / "tvm_flash")


def _kind_arch(target) -> tuple[str, str | None]:
    """(kind, arch) of a Target, or of a bare kind string ("cuda" means plain sm_90-class CUDA)."""
    if isinstance(target, str):
        return target, None
    kind = target.kind.name
    return kind, (str(target.attrs.get("arch", "")) or None) if kind == "cuda" else None


def schedule_module(target, workload: Workload):
    """The schedule module of a workload's forward on ``target`` (a Target, or a kind string)."""
    from . import schedules

    kind, arch = _kind_arch(target)
    return schedules.for_target(kind, workload.dtype, workload.head_dim, arch)


def backward_schedule_module(target, workload: Workload | None = None):
    """The schedule module of a workload's backward on ``target`` (a Target, or a kind string)."""
    from . import schedules

    kind, arch = _kind_arch(target)
    if workload is None:
        return schedules.backward_for_target(kind)
    return schedules.backward_for_target(kind, workload.dtype, workload.head_dim, arch)


def scheduled_func(workload: Workload, target, knobs: dict | None = None):
    """The scheduled PrimFunc for a workload on a target (or kind; schedule defaults unless ``knobs``)."""
    sched = schedule_module(target, workload)
    return sched.schedule(workload.head_dim, workload.dtype, workload.causal, **(knobs or {}))


def cache_key(workload: Workload, target: tvm.target.Target, knobs: dict | None = None, backward: bool = False) -> str:
    sched = backward_schedule_module(target, workload) if backward else schedule_module(target, workload)
    blob = json.dumps(
        {
            "workload": dataclasses.asdict(workload),
            "backward": backward,
            "knobs": knobs or {},
            "target": str(target),
            "tvm": tvm.__version__,
            "source": _source_hash(sched.__name__),
        },
        sort_keys=True,
    )
    w = workload
    return f"{'bwd' + w.name[3:] if backward else w.name}_{target.kind.name}_{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


@functools.lru_cache(maxsize=None)
def _source_hash(schedule_module_name: str) -> str:
    """Hash of the code a kernel is generated from: compute, shared helpers, its schedule."""
    import importlib

    from .schedules import common

    from . import compute_backward

    sched = importlib.import_module(schedule_module_name)
    # and the schedule modules it takes helpers from (cuda_wgmma_bwd: cuda_wgmma's mbarrier asm)
    package = common.__name__.rpartition(".")[0] + "."
    used = {inspect.getmodule(v) for v in vars(sched).values() if inspect.isfunction(v) or inspect.ismodule(v)}
    deps = sorted((m for m in used if m is not None and m.__name__.startswith(package) and m not in (common, sched)),
                  key=lambda m: m.__name__)
    modules = (compute, compute_backward, common, sched, *deps)
    return hashlib.sha256("".join(inspect.getsource(m) for m in modules).encode()).hexdigest()


def compile_kernel(workload: Workload, target: tvm.target.Target, knobs: dict | None = None):
    """Compile (no cache): returns the tvm Executable."""
    func = scheduled_func(workload, target, knobs)
    return tvm.compile(tvm.IRModule({"flash_fwd": func}), target=target)


class BackwardKernels(tuple):
    """``(dkdv, dq, prep)``: a compiled backward module's kernels (``prep`` None where the module
    has no delta pass), and ``dq_accum``: True where the dK/dV kernel also adds dQ's fp32 partial
    sums into a zeroed buffer and ``dq`` converts that buffer (``cuda_wgmma_bwd`` knob
    ``dq_accum``), False where ``dq`` is a dQ kernel of its own.  Run with ``ops._backward_into``."""

    dq_accum: bool

    def __new__(cls, mod, funcs):
        dq_accum = "flash_bwd_dq_convert" in funcs
        self = super().__new__(cls, (mod["flash_bwd_dkdv"], mod["flash_bwd_dq_convert" if dq_accum else "flash_bwd_dq"],
                                     mod["flash_bwd_prep"] if "flash_bwd_prep" in funcs else None))
        self.dq_accum = dq_accum
        return self


def get_backward_kernels(workload: Workload, target: tvm.target.Target, deterministic: bool = False):
    """``BackwardKernels`` ``(flash_bwd_dkdv, flash_bwd_dq, flash_bwd_prep or None)`` for a workload
    (``compute_backward``), from memory, disk or a fresh build (CPU: ``schedules.cpu``; CUDA:
    ``schedules.cuda_wgmma_bwd`` on sm_90a for fp16/bf16 at head dims 64/128, else
    ``schedules.cuda_simt``).  A module with ``flash_bwd_prep`` (delta = rowsum(dO * O) - dLSE)
    wants it run first and its delta passed in place of dLSE: ``ops._backward_into``.
    ``deterministic``: the schedule's ``deterministic_knobs`` over its defaults, where it has
    any (kernels that add with atomics: ``cuda_wgmma_bwd``'s hd128 causal ``dq_accum``; the others never
    do), so the same module where the defaults have no atomics."""
    sched = backward_schedule_module(target, workload)
    knobs = {}
    if deterministic and hasattr(sched, "deterministic_knobs"):
        knobs = sched.deterministic_knobs(workload.head_dim, workload.causal)
    key = cache_key(workload, target, knobs or None, backward=True)
    with _lock:
        fns = _memory.get(key)
        if fns is None:
            funcs = sched.schedule_backward(workload.head_dim, workload.dtype, workload.causal, **knobs)
            mod = _load_or_build(key, workload, target, lambda: tvm.compile(tvm.IRModule(funcs), target=target))
            fns = _memory[key] = BackwardKernels(mod, funcs)
    return fns


_memory: dict[str, object] = {}
_lock = threading.Lock()


def get_kernel(workload: Workload, target: tvm.target.Target, knobs: dict | None = None):
    """The ``flash_fwd`` function for a workload, from memory, disk or a fresh build.

    Without ``knobs``, the knobs of the workload's tuning log are used when there is one
    (``tune.tuned_knobs``), else the schedule's defaults."""
    if knobs is None:
        from .tune import tuned_knobs

        knobs = tuned_knobs(workload, target)
    key = cache_key(workload, target, knobs)
    with _lock:
        fn = _memory.get(key)
        if fn is None:
            mod = _load_or_build(key, workload, target, lambda: compile_kernel(workload, target, knobs))
            fn = _memory[key] = mod["flash_fwd"]
    return fn


def _load_or_build(key: str, workload: Workload, target: tvm.target.Target, compile_fn):
    """The module cached under ``key``, or ``compile_fn()`` exported there and loaded."""
    folder = cache_dir()
    path = folder / f"{key}.so"
    if path.exists():
        try:
            return tvm.runtime.load_module(str(path))
        except Exception as err:  # a damaged entry is rebuilt, never trusted
            log.warning("tvm_flash: cached kernel %s failed to load (%s); rebuilding", path, err)
    log.info("tvm_flash: compiling %s for %s", key.rsplit("_", 2)[0], target.kind.name)
    lib = compile_fn()
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, lib.export_library)
    return tvm.runtime.load_module(str(path))


def effective_knobs(workload: Workload, target, knobs: dict | None) -> dict:
    """The knobs a kernel is built with: ``knobs`` over the schedule's defaults."""
    sched = schedule_module(target, workload)
    if hasattr(sched, "merge_knobs"):  # schedules whose defaults depend on the given knobs
        merged = sched.merge_knobs(workload.head_dim, workload.dtype, workload.causal, knobs or {})
    else:
        try:
            defaults = sched.default_knobs(workload.head_dim, workload.dtype, workload.causal)
        except TypeError:  # schedules whose defaults do not depend on causality
            defaults = sched.default_knobs(workload.head_dim, workload.dtype)
        merged = {**defaults, **(knobs or {})}
    return {k: (int(v) if isinstance(v, bool) else v) for k, v in merged.items()}


def export(workloads, target: tvm.target.Target, folder) -> Path:
    """Build ``workloads`` (knobs from their tuning logs, else defaults) into
    ``folder/kernels-<dtype>.so`` (one library per dtype: CUDA kernels of different dtypes
    declare clashing ``extern __shared__`` buffers) + ``folder/manifest.json`` for
    ``tvm_flash.load``.  Files are written under temporary names and moved into place,
    the manifest last."""
    from . import runtime
    from .tune import tuned_knobs

    workloads = list(dict.fromkeys(workloads))
    if not workloads:
        raise ValueError("export: no workloads given")
    kind = target.kind.name
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for dtype in dict.fromkeys(wl.dtype for wl in workloads):
        library = f"kernels-{dtype}.so"
        funcs = {}
        for wl in (w for w in workloads if w.dtype == dtype):
            knobs = tuned_knobs(wl, target)
            funcs[wl.name] = scheduled_func(wl, target, knobs).with_attr("global_symbol", wl.name)
            entries.append({"name": wl.name, **dataclasses.asdict(wl), "library": library,
                            "knobs": effective_knobs(wl, target, knobs), "tuned": knobs is not None})
        log.info("tvm_flash: exporting %d %s kernels for %s", len(funcs), dtype, target)
        _write_atomic(folder / library, tvm.compile(tvm.IRModule(funcs), target=target).export_library)
    manifest = {
        "format": runtime.FORMAT,
        "tvm_flash": __version__,
        "tvm": tvm.__version__,
        "target": str(target),
        "target_kind": kind,
        "arch": str(target.attrs.get("arch", "")) if kind == "cuda" else "",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "kernels": entries,
    }
    _write_atomic(folder / runtime.MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1) + "\n"))
    return folder


def _umask() -> int:
    """The process umask, read without changing it (Linux), else by set-and-restore."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_atomic(path: Path, write) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then move it into place
    (readable as a normal file would be: mode 0666 minus the umask)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: others (e.g. a deployment user) must read it
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
