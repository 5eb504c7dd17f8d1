"""tvm_flash: FlashAttention for PyTorch, written as Apache TVM TensorIR.

Layers, top-down: ``compute`` / ``compute_backward`` (the attention algorithm in TensorIR) →
``schedules`` (how it runs on CPU / CUDA) → ``build`` (compile, export,
disk cache; ``tune`` picks knobs) → ``ops`` (the torch API).  ``runtime`` loads
exported kernels without the TVM compiler: importing tvm_flash imports no TVM;
the compiler is imported on the first kernel that must be built.  ``reference`` is the float64
reference every test compares against.

    import tvm_flash
    out = tvm_flash.attention(q, k, v, causal=True)                  # [B, H, S, D]
    out = tvm_flash.scaled_dot_product_attention(q, k, v, is_causal=True)
    tvm_flash.load("exported/")   # kernels from `tvm-flash export`, no TVM compiler
"""

import importlib.util as _ilu
import os as _os
import sys as _sys

__version__ = "0.1.0"


def _mount_source_schedules():
    """Installed, ``schedules/`` ships as ``tvm_flash.schedules``; in a source
    tree used through PYTHONPATH it sits beside this package: mount it there
    (called by ``build``: the schedules import the TVM compiler)."""
    if _ilu.find_spec("tvm_flash.schedules") is not None:
        return
    folder = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), _os.pardir, "schedules")
    spec = _ilu.spec_from_file_location(
        "tvm_flash.schedules", _os.path.join(folder, "__init__.py"), submodule_search_locations=[folder]
    )
    module = _ilu.module_from_spec(spec)
    _sys.modules["tvm_flash.schedules"] = module
    spec.loader.exec_module(module)


from .ops import attention, scaled_dot_product_attention  # noqa: E402
from .runtime import load  # noqa: E402

__all__ = ["attention", "scaled_dot_product_attention", "load", "__version__"]
