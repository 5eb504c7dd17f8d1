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
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import os
import tempfile
import threading
from pathlib import Path

import tvm

from . import compute

log = logging.getLogger("tvm_flash")


@dataclasses.dataclass(frozen=True)
class Workload:
    """What a compiled kernel is specialized for (everything else is symbolic)."""

    head_dim: int
    dtype: str  # "float32" | "float16" | "bfloat16"
    causal: bool


def make_target(kind: str, arch: str | None = None) -> tvm.target.Target:
    """The TVM target for "llvm" or "cuda" (``arch`` like "sm_90")."""
    if kind == "llvm":
        return tvm.target.Target({"kind": "llvm"})
    if kind == "cuda":
        return tvm.target.Target({"kind": "cuda", "arch": arch or "sm_90", "max_shared_memory_per_block": 232448})
    raise ValueError(f"unsupported target kind {kind!r}")


def cache_dir() -> Path:
    return Path(os.environ.get("TVM_FLASH_CACHE") or Path.home() / ".cache" / "tvm_flash")


def schedule_module(kind: str, workload: Workload):
    from . import schedules

    return schedules.for_target(kind, workload.dtype, workload.head_dim)


def scheduled_func(workload: Workload, kind: str):
    """The scheduled PrimFunc for a workload on a target kind."""
    sched = schedule_module(kind, workload)
    return sched.schedule(workload.head_dim, workload.dtype, workload.causal)


def cache_key(workload: Workload, target: tvm.target.Target) -> str:
    sched = schedule_module(target.kind.name, workload)
    from .schedules import common

    sources = "".join(inspect.getsource(m) for m in (compute, common, sched))
    blob = json.dumps(
        {
            "workload": dataclasses.asdict(workload),
            "target": str(target),
            "tvm": tvm.__version__,
            "source": hashlib.sha256(sources.encode()).hexdigest(),
        },
        sort_keys=True,
    )
    w = workload
    return f"fwd_{w.dtype}_d{w.head_dim}{'_causal' if w.causal else ''}_{target.kind.name}_{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def compile_kernel(workload: Workload, target: tvm.target.Target):
    """Compile (no cache): returns the tvm Executable."""
    func = scheduled_func(workload, target.kind.name)
    return tvm.compile(tvm.IRModule({"flash_fwd": func}), target=target)


_memory: dict[str, object] = {}
_lock = threading.Lock()


def get_kernel(workload: Workload, target: tvm.target.Target):
    """The ``flash_fwd`` function for a workload, from memory, disk or a fresh build."""
    key = cache_key(workload, target)
    with _lock:
        fn = _memory.get(key)
        if fn is None:
            fn = _load_or_build(key, workload, target)
            _memory[key] = fn
    return fn


def _load_or_build(key: str, workload: Workload, target: tvm.target.Target):
    folder = cache_dir()
    path = folder / f"{key}.so"
    if path.exists():
        try:
            return tvm.runtime.load_module(str(path))["flash_fwd"]
        except Exception as err:  # a damaged entry is rebuilt, never trusted
            log.warning("tvm_flash: cached kernel %s failed to load (%s); rebuilding", path, err)
    log.info("tvm_flash: compiling %s for %s", workload, target.kind.name)
    lib = compile_kernel(workload, target)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".so", dir=folder)
    os.close(fd)
    try:
        lib.export_library(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return tvm.runtime.load_module(str(path))["flash_fwd"]
