"""CPU (LLVM) schedule: query tiles run in parallel, each tile's phases serially.

The workers ``tx`` of the compute become a serial loop; the per-worker element
loop is unrolled so LLVM can vectorize across it.
"""

import tvm

from tvm_flash.compute import check_tiles, flash_forward

from .common import phase_loops, tile_loop


# What MetaSchedule may choose from (tvm_flash.tune); invalid combinations fail to build.
KNOB_SPACE = {"block_m": [16, 32, 64], "block_n": [16, 32, 64], "num_threads": [16, 32, 64]}


def default_knobs(head_dim: int, dtype: str) -> dict:
    # 32 query rows x 32 keys; 32 workers keeps every per-worker loop short.
    return {"block_m": 32, "block_n": 32, "num_threads": 32}


def schedule_backward(head_dim: int, dtype: str, causal: bool, **knobs) -> dict:
    """The backward PrimFuncs for the CPU (``compute_backward``): tiles in parallel.
    Returns {name: PrimFunc} for ``flash_bwd_dkdv`` and ``flash_bwd_dq``."""
    from tvm_flash.compute_backward import flash_backward

    k = {**default_knobs(head_dim, dtype), **knobs}
    funcs = {}
    for func in flash_backward(head_dim, dtype, causal, smem="global", reg="global", **k):
        sch = tvm.s_tir.Schedule(func)
        sch.parallel(tile_loop(sch))
        funcs[str(func.attrs["global_symbol"])] = sch.mod["main"]
    return funcs


def check_knobs(head_dim: int, dtype: str, causal: bool, knobs: dict) -> None:
    """Raise ValueError if the knobs (over the defaults) cannot build (cheap: no IR built)."""
    k = {**default_knobs(head_dim, dtype), **knobs}
    check_tiles(head_dim, dtype, k["block_m"], k["block_n"], k["num_threads"])


def schedule(head_dim: int, dtype: str, causal: bool, **knobs):
    """Return the scheduled PrimFunc for the CPU."""
    k = {**default_knobs(head_dim, dtype), **knobs}
    func = flash_forward(head_dim, dtype, causal, smem="global", reg="global", **k)
    sch = tvm.s_tir.Schedule(func)
    sch.parallel(tile_loop(sch))
    for _, _, i in phase_loops(sch):
        if i is not None and sch.get(i).extent.value <= 16:
            sch.unroll(i)
    return sch.mod["main"]
