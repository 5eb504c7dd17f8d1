"""Tensor-core FlashAttention-2 forward kernel for CUDA (sm_80+, tuned for H100), as TVM TIR.

The kernel is written at warp level with TVM's table-driven PTX dialect (``T.ptx``):

* one CTA per (query tile of ``block_m`` rows, q-head, batch); ``num_warps`` warps, each owning
  ``block_m / num_warps`` query rows (a multiple of 16, i.e. ``MT`` m16 tiles);
* Q tile -> shared memory once (``cp.async``), K/V tiles of ``block_n`` keys streamed through a
  ``num_stages``-deep ``cp.async`` ring; shared rows are padded by 16 bytes, so ``ldmatrix`` and the
  16-byte ``cp.async`` stores are free of bank conflicts;
* S = Q K^T with ``ldmatrix`` + ``mma.sync.m16n8k16`` (fp32 accumulators);
* online softmax on the S fragments in registers: row max / row sum over the four lanes of a quad
  with ``shfl.xor``, ``ex2.approx`` with ``scale * log2(e)`` folded into one FFMA;
* P is packed to fp16/bf16 pairs *in registers* (``cvt.rn.{f16,bf16}x2.f32``) and used directly as
  the A operand of the second MMA (two adjacent n8 accumulator tiles == one k16 A fragment);
  V fragments come from ``ldmatrix.trans``; O is rescaled by exp2(m_old - m_new);
* epilogue: O / l written to global (rows >= Sq are not written), LSE = m * scale + ln(l) (fp32).

Shapes: q/o [B, Hq, Sq, D], k/v [B, Hkv, Sk, D], lse [B, Hq, Sq]; B, Hq, Hkv, Sq, Sk are symbolic
int32 vars, so one compiled kernel serves every shape.  GQA/MQA: kv head = hq // (Hq // Hkv).
Causal masking is top-left aligned (query i sees keys j <= i, as torch SDPA ``is_causal``); key
tiles wholly above the diagonal are never visited.  Tails in Sq/Sk are handled in the kernel
(zero-filled cp.async + -inf masking).  ``scale`` must be positive (softmax scales are).

Why not ``tvm_flash.compute`` + s_tir primitives: the online softmax must run on the MMA
accumulator fragments in registers (row reductions across the four lanes of a quad), which s_tir
scheduling cannot express; so this kernel is written directly at warp level, with its knobs
(``block_m``, ``block_n``, ``num_warps``, ``num_stages``) as parameters.

Entry points (the interface of every schedule module): ``supports(head_dim, dtype)``,
``default_knobs(head_dim, dtype)`` and ``schedule(head_dim, dtype, causal, **knobs) -> PrimFunc``.
"""

from __future__ import annotations

import math

import tvm
from tvm.script import tirx as T

from tvm_flash.compute import LN2, LOG2E

from .common import MAX_SMEM, PTX_TYPE

__all__ = ["supports", "default_knobs", "schedule", "forward_tc", "smem_bytes"]



def _check(head_dim, dtype, block_m, block_n, num_warps, num_stages):
    if dtype not in PTX_TYPE:
        raise ValueError(f"dtype must be float16 or bfloat16, got {dtype!r}")
    if head_dim % 16 != 0 or not 16 <= head_dim <= 256:
        raise ValueError(f"head_dim must be a multiple of 16 in [16, 256], got {head_dim}")
    if block_m % (16 * num_warps) != 0:
        raise ValueError(f"block_m={block_m} must be a multiple of 16*num_warps={16 * num_warps}")
    if block_n % 16 != 0:
        raise ValueError(f"block_n={block_n} must be a multiple of 16")
    if num_stages < 1:
        raise ValueError("num_stages must be >= 1")
    nthreads = 32 * num_warps
    for rows in (block_m, block_n):
        if (rows * head_dim // 8) % nthreads != 0:
            raise ValueError(
                f"tile {rows}x{head_dim} is not a whole number of 16-byte copies per thread "
                f"({nthreads} threads)"
            )
    mt = block_m // num_warps // 16
    # fp32 registers per thread: O accumulators + S accumulators (the rest must fit too).
    regs = mt * (head_dim // 8) * 4 + mt * (block_n // 8) * 4
    if regs > 200:
        raise ValueError(
            f"head_dim={head_dim}, block_m={block_m}, block_n={block_n}, num_warps={num_warps} "
            f"needs {regs} accumulator registers per thread (> 200); use smaller block_m/block_n "
            f"or more warps (e.g. head_dim=256: block_m=64, block_n=32, num_warps=4)"
        )
    if smem_bytes(head_dim, block_m, block_n, num_stages) > MAX_SMEM:
        raise ValueError("tile configuration exceeds 227 KiB of shared memory")


def smem_bytes(head_dim, block_m=128, block_n=64, num_stages=2):
    """Dynamic shared memory used by one CTA (Q tile + num_stages K and V tiles, padded rows)."""
    sd = head_dim + 8
    return 2 * sd * (block_m + 2 * num_stages * block_n)


def forward_tc(
    head_dim: int,
    dtype: str,
    causal: bool,
    *,
    block_m: int = 128,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
    q_in_regs: bool | None = None,
    one_sync: bool = False,
    q_hoist: bool = False,
    lazy_rescale: bool = False,
    smem_epilogue: bool = False,
) -> tvm.tirx.PrimFunc:
    """Build the FlashAttention-2 forward PrimFunc ``flash_fwd`` (see the module docstring).

    Opt-in knobs (all off by default; off == the original kernel, code unchanged):

    * ``one_sync``: one ``__syncthreads`` per key tile instead of two.  Each iteration first waits
      for its own tile (``cp.async.wait_group(num_stages-2)``), then one barrier both publishes the
      tile and proves every warp is done with tile j-1, whose ring slot is refilled right after it.
      Needs ``num_stages >= 2``; the copy/compute overlap is the same as before.
    * ``q_hoist``: keep the Q fragments in registers (implies ``q_in_regs``) and load them once
      before the key loop instead of under ``if j == 0`` inside it.
    * ``lazy_rescale``: skip the O *= exp2(m_old - m_new) rescale of a row pair when no row of the
      warp changed its running max (warp-uniform ``__any_sync`` vote; exact, alpha would be 1.0).
    * ``smem_epilogue``: O / l goes through the warp's own (dead) rows of the Q tile in shared memory
      and is written to global with 16-byte coalesced stores (needs Q not re-read from shared memory
      after the loop: always true).
    """
    _check(head_dim, dtype, block_m, block_n, num_warps, num_stages)
    if one_sync and num_stages < 2:
        raise ValueError("one_sync needs num_stages >= 2")
    if q_hoist:
        q_in_regs = True
    D, BM, BN, NW, NS = head_dim, block_m, block_n, num_warps, num_stages
    NT = 32 * NW  # threads per CTA
    WM = BM // NW  # query rows per warp
    MT = WM // 16  # m16 tiles per warp
    NTN = BN // 8  # n8 tiles of S per warp
    DT = D // 8  # n8 tiles of O per warp
    KD = D // 16  # k16 slices of Q K^T
    KN = BN // 16  # k16 slices of P V
    SD = D + 8  # padded shared row (elements): +16 bytes kills ldmatrix bank conflicts
    CH = D // 8  # 16-byte chunks per row
    Q_IT = BM * CH // NT  # cp.async per thread for the Q tile
    KV_IT = BN * CH // NT  # cp.async per thread for one K (or V) tile
    RPI = NT // CH  # rows covered by one round of 16-byte copies (when NT % CH == 0)
    K_OFF = BM * SD  # element offsets inside the one shared.dyn buffer
    V_OFF = K_OFF + NS * BN * SD
    SMEM = V_OFF + NS * BN * SD
    if q_in_regs is None:
        q_in_regs = MT * KD * 4 <= 32  # keep Q fragments resident when they are cheap
    QR = MT * KD * 4 if q_in_regs else MT * 4

    ab = PTX_TYPE[dtype]
    mma = T.ptx[f"mma.sync.aligned.m16n8k16.row.col.f32.{ab}.{ab}.f32"]
    ldsm_x4 = T.ptx["ldmatrix.sync.aligned.m8n8.x4.shared.b16"]
    ldsm_x4_t = T.ptx["ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16"]
    cp_async = T.ptx["cp.async.cg.shared.global"]  # with src-size operand: zero-fill
    cp_async_nz = T.ptx["cp.async.cg.shared.global"]
    commit = T.ptx["cp.async.commit_group"]
    wait_group = T.ptx["cp.async.wait_group"]
    ex2 = T.ptx["ex2.approx.ftz.f32"]
    pack2 = T.ptx[f"cvt.rn.{ab}x2.f32"]
    NEG_INF = -math.inf
    FULL = 0xFFFFFFFF

    @T.macro
    def load_kv(smem, k, v, bz, hk, Sk, tile, slot, tx):
        # K/V tile `tile` -> ring slot `slot`; rows past Sk are zero-filled (src-size 0).
        if (tile + 1) * BN <= Sk:  # interior tile: no predicates, constant address strides
            if NT % CH == 0:
                for it in T.unroll(KV_IT):
                    so = slot * BN * SD + (tx // CH) * SD + (tx % CH) * 8
                    kr = tile * BN + tx // CH
                    cp_async_nz(T.ptx.addr(T.address_of(smem[K_OFF + so]), it * RPI * SD * 2),
                                T.ptx.addr(T.address_of(k[bz, hk, kr, (tx % CH) * 8]), it * RPI * D * 2), 16)
                    cp_async_nz(T.ptx.addr(T.address_of(smem[V_OFF + so]), it * RPI * SD * 2),
                                T.ptx.addr(T.address_of(v[bz, hk, kr, (tx % CH) * 8]), it * RPI * D * 2), 16)
            else:
                for it in T.unroll(KV_IT):
                    so = slot * BN * SD + ((it * NT + tx) // CH) * SD + ((it * NT + tx) % CH) * 8
                    kr = tile * BN + (it * NT + tx) // CH
                    cp_async_nz(T.address_of(smem[K_OFF + so]), T.address_of(k[bz, hk, kr, ((it * NT + tx) % CH) * 8]), 16)
                    cp_async_nz(T.address_of(smem[V_OFF + so]), T.address_of(v[bz, hk, kr, ((it * NT + tx) % CH) * 8]), 16)
        else:
            for it in T.unroll(KV_IT):
                so = slot * BN * SD + ((it * NT + tx) // CH) * SD + ((it * NT + tx) % CH) * 8
                kr = tile * BN + (it * NT + tx) // CH
                ok = T.if_then_else(kr < Sk, T.uint32(16), T.uint32(0))
                cp_async(T.address_of(smem[K_OFF + so]),
                         T.address_of(k[bz, hk, T.min(kr, Sk - 1), ((it * NT + tx) % CH) * 8]), 16, ok)
                cp_async(T.address_of(smem[V_OFF + so]),
                         T.address_of(v[bz, hk, T.min(kr, Sk - 1), ((it * NT + tx) % CH) * 8]), 16, ok)

    # fmt: off
    @T.prim_func
    def flash_fwd(q_h: T.handle, k_h: T.handle, v_h: T.handle, o_h: T.handle, lse_h: T.handle,
                  scale: T.float32):
        T.func_attr({"global_symbol": "flash_fwd", "tirx.noalias": True})
        B = T.int32()
        Hq = T.int32()
        Hkv = T.int32()
        Sq = T.int32()
        Sk = T.int32()
        q = T.match_buffer(q_h, (B, Hq, Sq, D), dtype)
        k = T.match_buffer(k_h, (B, Hkv, Sk, D), dtype)
        v = T.match_buffer(v_h, (B, Hkv, Sk, D), dtype)
        o = T.match_buffer(o_h, (B, Hq, Sq, D), dtype)
        lse = T.match_buffer(lse_h, (B, Hq, Sq), "float32")
        o32 = T.decl_buffer((B * Hq * Sq * (D // 2),), "uint32", data=o.data)  # o viewed as x2 words
        for bx in T.thread_binding((Sq + BM - 1) // BM, thread="blockIdx.x"):
            for hq in T.thread_binding(Hq, thread="blockIdx.y"):
                for bz in T.thread_binding(B, thread="blockIdx.z"):
                    smem = T.alloc_buffer((SMEM,), dtype, scope="shared.dyn")
                    for tx in T.thread_binding(NT, thread="threadIdx.x"):
                        qf = T.alloc_buffer((QR,), "uint32", scope="local")
                        kf = T.alloc_buffer((4,), "uint32", scope="local")
                        vf = T.alloc_buffer((4,), "uint32", scope="local")
                        pf = T.alloc_buffer((MT, 4), "uint32", scope="local")
                        s = T.alloc_buffer((MT, NTN, 4), "float32", scope="local")
                        acc = T.alloc_buffer((MT, DT, 4), "float32", scope="local")
                        m_i = T.alloc_buffer((MT, 2), "float32", scope="local")
                        l_i = T.alloc_buffer((MT, 2), "float32", scope="local")
                        red = T.alloc_buffer((1,), "float32", scope="local")
                        alpha = T.alloc_buffer((1,), "float32", scope="local")
                        mu = T.alloc_buffer((1,), "float32", scope="local")
                        pk = T.alloc_buffer((1,), "uint32", scope="local")
                        # m-tiles are visited heaviest-first when causal (longest key ranges)
                        m_blk = T.if_then_else(causal, (Sq + BM - 1) // BM - 1 - bx, bx)
                        m0 = m_blk * BM
                        hk = hq // (Hq // Hkv)
                        warp = tx // 32
                        lane = tx % 32
                        g = lane // 4
                        t4 = lane % 4
                        sl2 = scale * T.float32(LOG2E)
                        # key tiles to visit: all of them, or up to the diagonal if causal
                        kv_len = T.if_then_else(causal, T.min(T.min(m0 + BM, Sq), Sk), Sk)
                        n_blk = (kv_len + BN - 1) // BN

                        # ---- Q tile -> shared (zero-filled past Sq) ----
                        for it in T.unroll(Q_IT):
                            r = (it * NT + tx) // CH
                            c = (it * NT + tx) % CH
                            cp_async(T.address_of(smem[r * SD + c * 8]),
                                     T.address_of(q[bz, hq, T.min(m0 + r, Sq - 1), c * 8]), 16,
                                     T.if_then_else(m0 + r < Sq, T.uint32(16), T.uint32(0)))
                        # ---- prologue: first NS-1 K/V tiles ----
                        for st in T.unroll(NS - 1):
                            if st < n_blk:
                                load_kv(smem, k, v, bz, hk, Sk, st, st, tx)
                            commit()

                        for mt, dt, e in T.grid(MT, DT, 4):
                            acc[mt, dt, e] = T.float32(0)
                        for mt, hh in T.grid(MT, 2):
                            m_i[mt, hh] = T.float32(NEG_INF)
                            l_i[mt, hh] = T.float32(0)

                        if q_hoist:
                            # Q arrives with the first prologue group (NS == 1: commit it alone)
                            if NS == 1:
                                commit()
                            wait_group(0)
                            T.tvm_storage_sync("shared")
                            for mt, kd in T.grid(MT, KD):
                                ldsm_x4(qf[(mt * KD + kd) * 4 + 0], qf[(mt * KD + kd) * 4 + 1],
                                        qf[(mt * KD + kd) * 4 + 2], qf[(mt * KD + kd) * 4 + 3],
                                        T.address_of(smem[(warp * WM + mt * 16 + lane % 16) * SD
                                                          + kd * 16 + (lane // 16) * 8]))

                        for j in T.serial(n_blk):
                            if one_sync:
                                # tile j landed (own copies), then one barrier: tile j visible to all,
                                # and every warp is past tile j-1, so its slot may be refilled now
                                wait_group(NS - 2)
                                T.tvm_storage_sync("shared")
                                if j + NS - 1 < n_blk:
                                    load_kv(smem, k, v, bz, hk, Sk, j + NS - 1, (j + NS - 1) % NS, tx)
                                commit()
                            else:
                                # everyone is done with tile j-1: its ring slot may be refilled
                                T.tvm_storage_sync("shared")
                                if j + NS - 1 < n_blk:
                                    load_kv(smem, k, v, bz, hk, Sk, j + NS - 1, (j + NS - 1) % NS, tx)
                                commit()
                                wait_group(NS - 1)
                                T.tvm_storage_sync("shared")
                            k_base = K_OFF + (j % NS) * BN * SD
                            v_base = V_OFF + (j % NS) * BN * SD

                            if q_in_regs and not q_hoist:
                                if j == 0:
                                    for mt, kd in T.grid(MT, KD):
                                        ldsm_x4(qf[(mt * KD + kd) * 4 + 0], qf[(mt * KD + kd) * 4 + 1],
                                                qf[(mt * KD + kd) * 4 + 2], qf[(mt * KD + kd) * 4 + 3],
                                                T.address_of(smem[(warp * WM + mt * 16 + lane % 16) * SD
                                                                  + kd * 16 + (lane // 16) * 8]))

                            # ---- S = Q K^T ----
                            for mt, nt, e in T.grid(MT, NTN, 4):
                                s[mt, nt, e] = T.float32(0)
                            for kd in T.unroll(KD):
                                if not q_in_regs:
                                    for mt in T.unroll(MT):
                                        ldsm_x4(qf[mt * 4 + 0], qf[mt * 4 + 1], qf[mt * 4 + 2], qf[mt * 4 + 3],
                                                T.address_of(smem[(warp * WM + mt * 16 + lane % 16) * SD
                                                                  + kd * 16 + (lane // 16) * 8]))
                                for np_ in T.unroll(KN):
                                    # B fragments of key tiles 2*np_ and 2*np_+1 for this k16 slice
                                    ldsm_x4(kf[0], kf[1], kf[2], kf[3],
                                            T.address_of(smem[k_base + (np_ * 16 + (lane // 16) * 8 + lane % 8) * SD
                                                              + kd * 16 + ((lane // 8) % 2) * 8]))
                                    for mt, h2 in T.grid(MT, 2):
                                        qb = T.meta_var((mt * KD + kd) * 4 if q_in_regs else mt * 4)
                                        mma(s[mt, np_ * 2 + h2, 0], s[mt, np_ * 2 + h2, 1], s[mt, np_ * 2 + h2, 2], s[mt, np_ * 2 + h2, 3],
                                            qf[qb + 0], qf[qb + 1], qf[qb + 2], qf[qb + 3], kf[h2 * 2], kf[h2 * 2 + 1],
                                            s[mt, np_ * 2 + h2, 0], s[mt, np_ * 2 + h2, 1], s[mt, np_ * 2 + h2, 2], s[mt, np_ * 2 + h2, 3])

                            # ---- masking (only key-tail / diagonal tiles) ----
                            n0 = j * BN
                            if (n0 + BN > Sk) or (causal and n0 + BN - 1 > m0):
                                for mt, nt, e in T.grid(MT, NTN, 4):
                                    row = m0 + warp * WM + mt * 16 + g + (e // 2) * 8
                                    col = n0 + nt * 8 + t4 * 2 + e % 2
                                    if (col >= Sk) or (causal and col > row):
                                        s[mt, nt, e] = T.float32(NEG_INF)

                            # ---- online softmax on the fragments ----
                            for mt, hh in T.grid(MT, 2):
                                red[0] = m_i[mt, hh]
                                for nt, e in T.grid(NTN, 2):
                                    red[0] = T.max(red[0], s[mt, nt, hh * 2 + e])
                                red[0] = T.max(red[0], T.tvm_warp_shuffle_xor(T.uint32(FULL), red[0], 1, 32, 32))
                                red[0] = T.max(red[0], T.tvm_warp_shuffle_xor(T.uint32(FULL), red[0], 2, 32, 32))
                                # a row with nothing visible yet uses 0 as its (finite) reference point
                                mu[0] = T.if_then_else(red[0] == T.float32(NEG_INF), T.float32(0), red[0])
                                ex2(alpha[0], (m_i[mt, hh] - mu[0]) * sl2)
                                m_i[mt, hh] = red[0]
                                red[0] = mu[0] * sl2
                                for nt, e in T.grid(NTN, 2):
                                    ex2(s[mt, nt, hh * 2 + e], s[mt, nt, hh * 2 + e] * sl2 - red[0])
                                l_i[mt, hh] = l_i[mt, hh] * alpha[0]
                                for nt, e in T.grid(NTN, 2):
                                    l_i[mt, hh] = l_i[mt, hh] + s[mt, nt, hh * 2 + e]
                                if lazy_rescale:
                                    if T.call_extern("int32", "__any_sync", T.uint32(FULL), alpha[0] != T.float32(1)) != 0:
                                        for dt, e in T.grid(DT, 2):
                                            acc[mt, dt, hh * 2 + e] = acc[mt, dt, hh * 2 + e] * alpha[0]
                                else:
                                    for dt, e in T.grid(DT, 2):
                                        acc[mt, dt, hh * 2 + e] = acc[mt, dt, hh * 2 + e] * alpha[0]

                            # ---- O += P V, P straight from the S registers ----
                            for kn in T.unroll(KN):
                                for mt in T.unroll(MT):
                                    pack2(pf[mt, 0], s[mt, 2 * kn, 1], s[mt, 2 * kn, 0])
                                    pack2(pf[mt, 1], s[mt, 2 * kn, 3], s[mt, 2 * kn, 2])
                                    pack2(pf[mt, 2], s[mt, 2 * kn + 1, 1], s[mt, 2 * kn + 1, 0])
                                    pack2(pf[mt, 3], s[mt, 2 * kn + 1, 3], s[mt, 2 * kn + 1, 2])
                                for dp in T.unroll(D // 16):
                                    ldsm_x4_t(vf[0], vf[1], vf[2], vf[3],
                                              T.address_of(smem[v_base + (kn * 16 + ((lane // 8) % 2) * 8 + lane % 8) * SD
                                                                + dp * 16 + (lane // 16) * 8]))
                                    for mt in T.unroll(MT):
                                        mma(acc[mt, 2 * dp, 0], acc[mt, 2 * dp, 1], acc[mt, 2 * dp, 2], acc[mt, 2 * dp, 3],
                                            pf[mt, 0], pf[mt, 1], pf[mt, 2], pf[mt, 3], vf[0], vf[1],
                                            acc[mt, 2 * dp, 0], acc[mt, 2 * dp, 1], acc[mt, 2 * dp, 2], acc[mt, 2 * dp, 3])
                                        mma(acc[mt, 2 * dp + 1, 0], acc[mt, 2 * dp + 1, 1], acc[mt, 2 * dp + 1, 2], acc[mt, 2 * dp + 1, 3],
                                            pf[mt, 0], pf[mt, 1], pf[mt, 2], pf[mt, 3], vf[2], vf[3],
                                            acc[mt, 2 * dp + 1, 0], acc[mt, 2 * dp + 1, 1], acc[mt, 2 * dp + 1, 2], acc[mt, 2 * dp + 1, 3])

                        # ---- epilogue: O / l and LSE ----
                        if smem_epilogue:
                            # the warp's own Q rows are dead now: stage O there, then 16-byte stores
                            s32 = T.decl_buffer((SMEM // 2,), "uint32", data=smem.data, scope="shared.dyn")
                            T.tvm_storage_sync("warp")
                            for mt, hh in T.grid(MT, 2):
                                red[0] = l_i[mt, hh]
                                red[0] = red[0] + T.tvm_warp_shuffle_xor(T.uint32(FULL), red[0], 1, 32, 32)
                                red[0] = red[0] + T.tvm_warp_shuffle_xor(T.uint32(FULL), red[0], 2, 32, 32)
                                alpha[0] = T.if_then_else(red[0] > T.float32(0), T.float32(1) / red[0], T.float32(0))
                                for dt in T.unroll(DT):
                                    pack2(pk[0], acc[mt, dt, hh * 2 + 1] * alpha[0], acc[mt, dt, hh * 2] * alpha[0])
                                    s32[((warp * WM + mt * 16 + g + hh * 8) * SD + dt * 8 + t4 * 2) // 2] = pk[0]
                                row = m0 + warp * WM + mt * 16 + g + hh * 8
                                if row < Sq:
                                    if t4 == 0:
                                        lse[bz, hq, row] = (m_i[mt, hh] * sl2 + T.log2(red[0])) * T.float32(LN2)
                            T.tvm_storage_sync("warp")
                            for it in T.unroll(WM * CH // 32):
                                r = (it * 32 + lane) // CH
                                c = (it * 32 + lane) % CH
                                if m0 + warp * WM + r < Sq:
                                    o32[T.ramp((((bz * Hq + hq) * Sq + m0 + warp * WM + r) * D + c * 8) // 2, 1, 4)] = \
                                        s32[T.ramp(((warp * WM + r) * SD + c * 8) // 2, 1, 4)]
                        else:
                            for mt, hh in T.grid(MT, 2):
                                red[0] = l_i[mt, hh]
                                red[0] = red[0] + T.tvm_warp_shuffle_xor(T.uint32(FULL), red[0], 1, 32, 32)
                                red[0] = red[0] + T.tvm_warp_shuffle_xor(T.uint32(FULL), red[0], 2, 32, 32)
                                row = m0 + warp * WM + mt * 16 + g + hh * 8
                                if row < Sq:
                                    alpha[0] = T.if_then_else(red[0] > T.float32(0), T.float32(1) / red[0], T.float32(0))
                                    for dt in T.unroll(DT):  # two outputs per 32-bit store
                                        pack2(pk[0], acc[mt, dt, hh * 2 + 1] * alpha[0], acc[mt, dt, hh * 2] * alpha[0])
                                        o32[(((bz * Hq + hq) * Sq + row) * D + dt * 8 + t4 * 2) // 2] = pk[0]
                                    if t4 == 0:
                                        lse[bz, hq, row] = (m_i[mt, hh] * sl2 + T.log2(red[0])) * T.float32(LN2)
    # fmt: on
    return flash_fwd


# What MetaSchedule may choose from (tvm_flash.tune); forward_tc rejects invalid combinations
# with ValueError (a build error for the tuner).  Booleans as 0/1.
KNOB_SPACE = {
    "block_m": [64, 128],
    "block_n": [32, 64, 128],
    "num_warps": [4, 8],
    "num_stages": [2, 3],
    "one_sync": [0, 1],
    "lazy_rescale": [0, 1],
    "smem_epilogue": [0, 1],
}


def supports(head_dim: int, dtype: str) -> bool:
    """fp16/bf16 with a head dim that is a multiple of 16 in [32, 256]."""
    return dtype in PTX_TYPE and head_dim % 16 == 0 and 32 <= head_dim <= 256


def default_knobs(head_dim: int, dtype: str, causal: bool = False) -> dict:
    """Hand-picked defaults: the best of knob sweeps on the H100 (bf16, seq 4096;
    benchmarks/sweep_knobs.py and the opt-in knob sweep; numbers in docs/perf-notes.md)."""
    base = {"block_m": 128, "block_n": 64, "num_warps": 4, "num_stages": 2,
            "one_sync": False, "lazy_rescale": False, "smem_epilogue": False}  # every tuned knob, stated
    if head_dim > 128:
        return {**base, "block_m": 64, "block_n": 32}
    if head_dim == 128:  # 344 TFLOP/s non-causal / 302 causal, vs 332 / 299 without these
        return {**base, "one_sync": True, "lazy_rescale": True, "smem_epilogue": True}
    if head_dim > 64 and not causal:  # 128x32 avoids the 128x64 register spill
        return {**base, "block_n": 32}
    return base  # hd64: the opt-in knobs measured slower (300 vs 324)


def check_knobs(head_dim: int, dtype: str, causal: bool, knobs: dict) -> None:
    """Raise ValueError if the knobs (over the defaults) cannot build (cheap: no IR built)."""
    k = {**default_knobs(head_dim, dtype, causal), **knobs}
    _check(head_dim, dtype, k["block_m"], k["block_n"], k["num_warps"], k["num_stages"])
    if k.get("one_sync") and k["num_stages"] < 2:
        raise ValueError("one_sync needs num_stages >= 2")


def schedule(head_dim: int, dtype: str, causal: bool, **knobs) -> tvm.tirx.PrimFunc:
    """The tensor-core kernel for a workload, default knobs overridden by ``knobs``
    (0/1 values of the on/off knobs, as tuning records hold them, become bools)."""
    knobs = {**default_knobs(head_dim, dtype, causal), **knobs}
    for name in _BOOL_KNOBS:
        if knobs.get(name) is not None:
            knobs[name] = bool(knobs[name])
    return forward_tc(head_dim, dtype, causal, **knobs)


_BOOL_KNOBS = ("q_in_regs", "one_sync", "q_hoist", "lazy_rescale", "smem_epilogue")
