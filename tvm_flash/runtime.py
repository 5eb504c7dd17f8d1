"""Exported kernels: load a ``tvm-flash export`` folder with no TVM compiler.

``tvm-flash export --out DIR`` (``build.export``) writes ``DIR/kernels-<dtype>.so``
(one function per workload, named like ``fwd_bfloat16_d128_causal``) and
``DIR/manifest.json`` (tvm_flash and TVM versions, target, the workloads and
their knobs).  ``load(DIR)`` opens it with only TVM's *runtime* libraries
(``libtvm_runtime.so``, plus ``libtvm_runtime_cuda.so`` for CUDA kernels) and the
``tvm_ffi`` package: ``import tvm`` and the compiler library are never loaded
(unless this process loaded them already).  The kernels are registered for
``tvm_flash.attention``, which then uses them before building anything.

``$TVM_FLASH_KERNELS`` (folders separated by ``os.pathsep``) is loaded on the
first attention call.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import logging
import os
import sys
import threading
from pathlib import Path

from .workload import Workload

log = logging.getLogger("tvm_flash")

MANIFEST = "manifest.json"
FORMAT = 1

# (device kind "cpu" | "cuda", arch like "sm_90" or "", Workload) -> kernel
_kernels: dict[tuple[str, str, Workload], object] = {}
_lock = threading.Lock()
_env_loaded = False


def _tvm_lib_dir() -> Path:
    spec = importlib.util.find_spec("tvm")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("tvm_flash.load needs the apache-tvm package (its runtime libraries), which is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "lib"


_runtime_libs: dict[str, object] = {}


def _load_runtime(cuda: bool) -> None:
    """Load TVM's runtime libraries (not the compiler) once per process."""
    if "tvm" in sys.modules:  # the full TVM is here already, CUDA loader included
        import tvm  # noqa: F401

        return
    import tvm_ffi  # noqa: F401  (loads libtvm_ffi)

    libdir = _tvm_lib_dir()
    if "runtime" not in _runtime_libs:
        _runtime_libs["runtime"] = ctypes.CDLL(str(libdir / "libtvm_runtime.so"), mode=ctypes.RTLD_GLOBAL)
    if cuda and "cuda" not in _runtime_libs:
        try:
            import torch

            torch.cuda.init()  # torch's libcudart is then in the process for libtvm_runtime_cuda
        except Exception:  # noqa: BLE001
            pass
        try:
            _runtime_libs["cuda"] = ctypes.CDLL(str(libdir / "libtvm_runtime_cuda.so"), mode=ctypes.RTLD_LOCAL)
        except OSError as err:
            raise RuntimeError(f"tvm_flash.load: TVM's CUDA runtime library could not be loaded ({err})") from err


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"tvm_flash.load: {folder} has no {MANIFEST} (is it a `tvm-flash export` folder?)")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"tvm_flash.load: {path} is not valid JSON ({err})") from err
    if manifest.get("format") != FORMAT:
        raise ValueError(f"tvm_flash.load: {path} has format {manifest.get('format')!r}; this tvm_flash reads format {FORMAT}")
    return manifest


def load(folder) -> list[Workload]:
    """Load an exported kernel folder; returns the workloads it serves.

    After this, ``tvm_flash.attention`` runs those workloads on a matching device
    (CUDA arch as exported) with no compilation and no TVM compiler."""
    folder = Path(folder).expanduser().resolve()
    manifest = _read_manifest(folder)
    kind, arch = manifest["target_kind"], manifest.get("arch", "")
    _load_runtime(cuda=kind == "cuda")
    import tvm_ffi

    modules = {}
    for entry in manifest["kernels"]:
        name = entry["library"]
        if name not in modules:
            lib_path = folder / name
            if not lib_path.is_file():
                raise FileNotFoundError(f"tvm_flash.load: {lib_path} (named in {folder / MANIFEST}) is missing")
            modules[name] = tvm_ffi.load_module(str(lib_path))
    device = "cpu" if kind == "llvm" else "cuda"
    loaded = []
    with _lock:
        for entry in manifest["kernels"]:
            workload = Workload(int(entry["head_dim"]), str(entry["dtype"]), bool(entry["causal"]))
            _kernels[(device, arch, workload)] = modules[entry["library"]][entry["name"]]
            loaded.append(workload)
    from . import ops

    ops._kernel.cache_clear()  # kernels looked up before this load are looked up again
    log.info("tvm_flash: loaded %d exported kernels for %s %s from %s", len(loaded), kind, arch, folder)
    return loaded


def exported_kernel(device: str, arch: str, workload: Workload):
    """The loaded kernel for a workload on a device kind and arch, or None."""
    global _env_loaded
    if not _env_loaded:
        _env_loaded = True
        for folder in filter(None, os.environ.get("TVM_FLASH_KERNELS", "").split(os.pathsep)):
            load(folder)
    return _kernels.get((device, arch, workload))


def loaded_workloads() -> list[tuple[str, str, Workload]]:
    return sorted(_kernels, key=str)
