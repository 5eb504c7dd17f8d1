"""Schedules: how the attention computation of ``tvm_flash.compute`` runs on a target.

Installed as the package ``tvm_flash.schedules`` (see pyproject.toml).  Each
module turns the unscheduled PrimFunc into one ready for ``tvm.compile``:

- ``cpu``        LLVM: query tiles in parallel, inner loops unrolled/vectorized.
- ``cuda_simt``  CUDA, plain FFMA: one thread block per query tile, phases
                 bound to ``threadIdx.x``, tiles in shared memory.  Serves
                 fp32 and every head dim.

``for_target(kind, dtype, head_dim)`` picks the module for a workload.
"""

from . import cpu, cuda_simt


def for_target(kind: str, dtype: str, head_dim: int):
    """The schedule module used for a target kind ("llvm" or "cuda")."""
    if kind == "llvm":
        return cpu
    if kind == "cuda":
        return cuda_simt
    raise ValueError(f"no schedule for target kind {kind!r} (supported: 'llvm', 'cuda')")
