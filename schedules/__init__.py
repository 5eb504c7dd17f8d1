"""Schedules: how the attention computation of ``tvm_flash.compute`` runs on a target.

Installed as the package ``tvm_flash.schedules`` (see pyproject.toml).  Each
module turns the unscheduled PrimFunc into one ready for ``tvm.compile``:

- ``cpu``        LLVM: query tiles in parallel, inner loops unrolled/vectorized.
- ``cuda_tc``    CUDA tensor cores (fp16/bf16, head dim a multiple of 16):
                 FlashAttention-2 at warp level (ldmatrix + mma.sync, cp.async
                 ring, P kept in registers).
- ``cuda_simt``  CUDA, plain FFMA: one thread block per query tile, phases
                 bound to ``threadIdx.x``, tiles in shared memory.  Serves
                 fp32 and the head dims the tensor-core kernel does not.

``for_target(kind, dtype, head_dim)`` picks the module for a workload.
"""

from . import cpu, cuda_simt, cuda_tc


def for_target(kind: str, dtype: str, head_dim: int):
    """The schedule module used for a target kind ("llvm" or "cuda")."""
    if kind == "llvm":
        return cpu
    if kind == "cuda":
        return cuda_tc if cuda_tc.supports(head_dim, dtype) else cuda_simt
    raise ValueError(f"no schedule for target kind {kind!r} (supported: 'llvm', 'cuda')")
