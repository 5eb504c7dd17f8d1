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
import threading
from pathlib import Path

from .workload import Workload

log = logging.getLogger("tvm_flash")

MANIFEST = "manifest.json"
FORMAT = 1

# (device kind "cpu" | "cuda", arch like "sm_90" or "", Workload) -> kernel
_kernels: dict[tuple[str, str, Workload], object] = {}
_lock = threading.Lock()
_env_lock = threading.Lock()
_env_loaded = False


def _tvm_lib_dir() -> Path:
    spec = importlib.util.find_spec("tvm")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("tvm_flash.load needs the apache-tvm package (its runtime libraries), which is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "lib"


_runtime_libs: dict[str, object] = {}
KINDS = {"llvm": "cpu", "cuda": "cuda"}  # manifest target kind -> torch device type


def _load_runtime(cuda: bool) -> None:
    """Load TVM's runtime libraries (not the compiler) once per process.  dlopen of a library
    already loaded (e.g. by ``import tvm``) only takes another reference."""
    import tvm_ffi  # noqa: F401  (loads libtvm_ffi)

    libdir = _tvm_lib_dir()
    if "runtime" not in _runtime_libs:
        _runtime_libs["runtime"] = ctypes.CDLL(str(libdir / "libtvm_runtime.so"), mode=ctypes.RTLD_GLOBAL)
    if cuda and "cuda" not in _runtime_libs:
        try:
            _runtime_libs["cuda"] = ctypes.CDLL(str(libdir / "libtvm_runtime_cuda.so"), mode=ctypes.RTLD_LOCAL)
        except OSError as err:
            raise RuntimeError(
                f"tvm_flash.load: TVM's CUDA runtime library could not be loaded ({err}); it needs the CUDA "
                "driver (libcuda.so.1) and the CUDA 13 runtime (libcudart.so.13) on the library path"
            ) from err


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"tvm_flash.load: {folder} has no {MANIFEST} (is it a `tvm-flash export` folder?)")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"tvm_flash.load: {path} is not valid JSON ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise ValueError(f"tvm_flash.load: {path} has format {got!r}; this tvm_flash reads format {FORMAT}")
    if manifest.get("target_kind") not in KINDS:
        raise ValueError(f"tvm_flash.load: {path}: target_kind {manifest.get('target_kind')!r} is not one of {sorted(KINDS)}")
    kernels = manifest.get("kernels")
    fields = ("name", "library", "head_dim", "dtype", "causal")
    if not isinstance(kernels, list) or not all(isinstance(e, dict) and all(f in e for f in fields) for e in kernels):
        raise ValueError(f"tvm_flash.load: {path}: 'kernels' must be a list of entries with {', '.join(fields)}")
    try:
        from importlib.metadata import version

        installed = version("apache-tvm")
    except Exception:  # noqa: BLE001
        installed = None
    if installed and manifest.get("tvm") and manifest["tvm"] != installed:
        log.warning("tvm_flash: %s was exported with TVM %s; this process has TVM %s", path, manifest["tvm"], installed)
    return manifest


def load(folder, *, _replace: bool = True) -> list[Workload]:
    """Load an exported kernel folder; returns the workloads it serves.

    After this, ``tvm_flash.attention`` runs those workloads on a matching device
    (CUDA arch as exported) with no compilation and no TVM compiler."""
    folder = Path(folder).expanduser().resolve()
    manifest = _read_manifest(folder)
    kind, arch = manifest["target_kind"], str(manifest.get("arch", ""))
    _load_runtime(cuda=kind == "cuda")
    import tvm_ffi

    modules, found = {}, []
    for entry in manifest["kernels"]:
        name = entry["library"]
        if name not in modules:
            lib_path = folder / name
            if not lib_path.is_file():
                raise FileNotFoundError(f"tvm_flash.load: {lib_path} (named in {folder / MANIFEST}) is missing")
            modules[name] = tvm_ffi.load_module(str(lib_path))
        try:
            fn = modules[name][entry["name"]]
        except (AttributeError, KeyError) as err:
            raise ValueError(f"tvm_flash.load: {folder / name} has no kernel {entry['name']!r} (named in {folder / MANIFEST})") from err
        found.append((Workload(int(entry["head_dim"]), str(entry["dtype"]), bool(entry["causal"])), fn))
    device = KINDS[kind]
    with _lock:
        for workload, fn in found:
            if _replace or (device, arch, workload) not in _kernels:
                _kernels[(device, arch, workload)] = fn
    from . import ops

    ops._kernel.cache_clear()  # kernels looked up before this load are looked up again
    log.info("tvm_flash: loaded %d exported kernels for %s %s from %s", len(found), kind, arch, folder)
    return [w for w, _ in found]


def _load_env() -> None:
    """Load ``$TVM_FLASH_KERNELS`` once (kernels loaded explicitly before keep precedence)."""
    global _env_loaded
    if _env_loaded:
        return
    with _env_lock:
        if not _env_loaded:
            for folder in filter(None, os.environ.get("TVM_FLASH_KERNELS", "").split(os.pathsep)):
                load(folder, _replace=False)
            _env_loaded = True  # only once every folder loaded: a failure is raised again next call


def exported_kernel(device: str, arch: str, workload: Workload):
    """The loaded kernel for a workload on a device kind and arch, or None.  Warns (once per
    workload) when kernels for it are loaded only for another CUDA arch."""
    _load_env()
    kernel = _kernels.get((device, arch, workload))
    if kernel is None and arch.endswith("a"):  # e.g. an sm_90 export runs on an sm_90a device
        kernel = _kernels.get((device, arch[:-1], workload))
    if kernel is None:
        others = sorted(a for (d, a, w) in list(_kernels) if d == device and w == workload and a not in (arch, arch[:-1]))
        if others:
            log.warning("tvm_flash: exported %s kernels are loaded for %s, but this device is %s: not used",
                        workload.name, ", ".join(others), arch)
    return kernel


def loaded_workloads() -> list[tuple[str, str, Workload]]:
    return sorted(_kernels, key=str)
