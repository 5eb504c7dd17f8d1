"""CUDA schedule with plain FFMA (no tensor cores): the always-available GPU path.

One thread block of ``num_threads`` threads per (batch, head, query tile);
every phase of the compute is bound to ``threadIdx.x`` (TVM inserts the
``__syncthreads`` between phases) and each thread's element loop is unrolled
so its share of the output accumulator lives in registers.  Tiles live in
static shared memory, so the tile sizes are chosen to fit 48 KB.

``schedule_backward`` does the same for the two backward PrimFuncs of
``tvm_flash.compute_backward`` (one block per key tile for dK/dV, per query
tile for dQ): the first CUDA backward, for every dtype and head dim.
"""

import tvm

from tvm_flash.compute import check_tiles, flash_forward
from tvm_flash.compute_backward import flash_backward

from .common import phase_loops, tile_loop

SMEM_LIMIT = 48 * 1024
_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


# What MetaSchedule may choose from (tvm_flash.tune); invalid combinations fail to build.
KNOB_SPACE = {"block_m": [16, 32], "block_n": [8, 16, 32], "num_threads": [64, 128]}


def smem_bytes(head_dim: int, dtype: str, block_m: int, block_n: int) -> int:
    """Shared memory of one block: Q, K, V tiles, the P tile and three row vectors."""
    return (block_m + 2 * block_n) * head_dim * _BYTES[dtype] + block_m * block_n * 4 + 3 * block_m * 4


def default_knobs(head_dim: int, dtype: str) -> dict:
    """The largest tile that fits in static shared memory."""
    for bm, bn, nt in ((32, 32, 128), (32, 16, 128), (16, 16, 128), (16, 8, 128), (16, 8, 64)):
        divisible = (bm * head_dim) % nt == 0 and (bn * head_dim) % nt == 0
        if divisible and smem_bytes(head_dim, dtype, bm, bn) <= SMEM_LIMIT:
            return {"block_m": bm, "block_n": bn, "num_threads": nt}
    raise ValueError(f"head_dim={head_dim} {dtype} does not fit the CUDA FFMA kernel")


def check_knobs(head_dim: int, dtype: str, causal: bool, knobs: dict) -> None:
    """Raise ValueError if the knobs (over the defaults) cannot build (cheap: no IR built)."""
    k = {**default_knobs(head_dim, dtype), **knobs}
    check_tiles(head_dim, dtype, k["block_m"], k["block_n"], k["num_threads"])
    if smem_bytes(head_dim, dtype, k["block_m"], k["block_n"]) > SMEM_LIMIT:
        raise ValueError(f"tile {k} needs more than {SMEM_LIMIT} bytes of shared memory")


def schedule(head_dim: int, dtype: str, causal: bool, **knobs):
    """Return the scheduled PrimFunc for CUDA."""
    k = {**default_knobs(head_dim, dtype), **knobs}
    if smem_bytes(head_dim, dtype, k["block_m"], k["block_n"]) > SMEM_LIMIT:
        raise ValueError(f"tile {k} needs more than {SMEM_LIMIT} bytes of shared memory")
    func = flash_forward(head_dim, dtype, causal, smem="shared", reg="local", **k)
    sch = tvm.s_tir.Schedule(func)
    sch.bind(tile_loop(sch), "blockIdx.x")
    for _, tx, i in phase_loops(sch):
        sch.bind(tx, "threadIdx.x")
        if i is not None:
            sch.unroll(i)
    return sch.mod["main"]


def smem_bytes_backward(head_dim: int, dtype: str, block_m: int, block_n: int) -> int:
    """Shared memory of one backward block: Q, dO, K, V tiles, the P and dS tiles, two row vectors."""
    return (2 * block_m + 2 * block_n) * head_dim * _BYTES[dtype] + 2 * block_m * block_n * 4 + 2 * block_m * 4


def default_knobs_backward(head_dim: int, dtype: str) -> dict:
    """The largest square tile that fits in static shared memory (block_n <= num_threads)."""
    for bm, bn, nt in ((32, 32, 128), (16, 16, 128), (16, 16, 64), (16, 16, 32), (8, 8, 64), (8, 8, 32)):
        try:
            check_tiles(head_dim, dtype, bm, bn, nt)
        except ValueError:
            continue
        if smem_bytes_backward(head_dim, dtype, bm, bn) <= SMEM_LIMIT:
            return {"block_m": bm, "block_n": bn, "num_threads": nt}
    raise ValueError(f"head_dim={head_dim} {dtype} does not fit the CUDA FFMA backward kernel")


def schedule_backward(head_dim: int, dtype: str, causal: bool, **knobs) -> dict:
    """The backward PrimFuncs for CUDA: {"flash_bwd_dkdv": ..., "flash_bwd_dq": ...}."""
    k = {**default_knobs_backward(head_dim, dtype), **knobs}
    if smem_bytes_backward(head_dim, dtype, k["block_m"], k["block_n"]) > SMEM_LIMIT:
        raise ValueError(f"tile {k} needs more than {SMEM_LIMIT} bytes of shared memory")
    funcs = {}
    for func in flash_backward(head_dim, dtype, causal, smem="shared", reg="local", **k):
        sch = tvm.s_tir.Schedule(func)
        sch.bind(tile_loop(sch), "blockIdx.x")
        for block in sch.get_child_blocks(sch.get_sblock("tile")):
            loops = sch.get_loops(block)  # inside the tile: [serial loops over tiles..., tx(, i)]
            row_phase = sch.get(block).name_hint.startswith("row_delta")
            tx, i = (loops[-1], None) if row_phase else (loops[-2], loops[-1])
            sch.bind(tx, "threadIdx.x")
            if i is not None:
                sch.unroll(i)
        funcs[str(func.attrs["global_symbol"])] = sch.mod["main"]
    return funcs
