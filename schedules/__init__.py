"""Schedules: how the attention computation of ``tvm_flash.compute`` runs on a target.

Installed as the package ``tvm_flash.schedules`` (see pyproject.toml).  Each
module turns the unscheduled PrimFunc into one ready for ``tvm.compile``:

- ``cpu``        LLVM: a vectorized kernel of its own (K tile transposed, vector FMAs
                 over keys and over D, polynomial exp2; built for the host CPU), or
                 the generic compute's phases (query tiles in parallel).
- ``cuda_wgmma`` Hopper (target arch ``sm_90a``) tensor cores through warpgroup
                 ``wgmma`` (fp16/bf16, head dims 64/128/192/256): Q/K/V tiles in
                 128-byte-swizzled shared memory read by matrix descriptors, P kept
                 in registers as the A operand of the second wgmma.
- ``cuda_tc``    CUDA tensor cores (fp16/bf16, head dim a multiple of 16):
                 FlashAttention-2 at warp level (ldmatrix + mma.sync, cp.async
                 ring, P kept in registers).
- ``cuda_ffma``  CUDA fp32 on CUDA cores (exact: no TF32), register-tiled per
                 thread (rows x keys of S, rows x dims of O), cp.async ring.
- ``cuda_simt``  CUDA, plain FFMA: one thread block per query tile, phases
                 bound to ``threadIdx.x``, tiles in shared memory.  Serves
                 the head dims the two kernels above do not (not multiples of 16),
                 and the backward where ``cuda_wgmma_bwd`` does not apply.
- ``cuda_wgmma_bwd`` Hopper (``sm_90a``) backward on ``wgmma`` (fp16/bf16, head dims
                 64/128): dK/dV per key tile and dQ per query tile.

``for_target(kind, dtype, head_dim, arch)`` picks the module for a workload's forward,
``backward_for_target(kind, dtype, head_dim, arch)`` the one whose ``schedule_backward``
builds its backward.
"""

from . import cpu, cuda_ffma, cuda_simt, cuda_tc, cuda_wgmma, cuda_wgmma_bwd


def for_target(kind: str, dtype: str, head_dim: int, arch: str | None = None):
    """The schedule module used for a target kind ("llvm" or "cuda") and CUDA arch ("sm_90a"
    enables the wgmma kernel; plain "sm_90" and others use the mma.sync kernel)."""
    if kind == "llvm":
        return cpu
    if kind == "cuda":
        candidates = (cuda_wgmma, cuda_tc, cuda_ffma) if arch == "sm_90a" else (cuda_tc, cuda_ffma)
        for module in candidates:
            if module.supports(head_dim, dtype):
                return module
        return cuda_simt
    raise ValueError(f"no schedule for target kind {kind!r} (supported: 'llvm', 'cuda')")


def backward_for_target(kind: str, dtype: str | None = None, head_dim: int | None = None, arch: str | None = None):
    """The schedule module with ``schedule_backward`` for a target kind (on CUDA "sm_90a",
    fp16/bf16 at head dims 64/128 get the wgmma backward; the rest the plain FFMA one)."""
    if kind == "llvm":
        return cpu
    if kind == "cuda":
        if arch == "sm_90a" and dtype is not None and cuda_wgmma_bwd.supports(head_dim, dtype):
            return cuda_wgmma_bwd
        return cuda_simt
    raise ValueError(f"no backward schedule for target kind {kind!r} (supported: 'llvm', 'cuda')")
