"""FlashAttention forward in fp32 on CUDA cores (FFMA), register-tiled per thread, as TVM TIR.

The fp32 path must stay exact (max error <= 1e-5), so no tensor cores (TF32 rounds the
inputs).  Like ``cuda_tc``, the kernel is written at thread level:

* one CTA per (query tile of ``block_m`` rows, q-head, batch), ``num_warps`` warps; each
  half-warp (16 lanes) owns ``rows`` consecutive query rows, so block_m = 2 * num_warps * rows;
* Q tile -> shared memory once, K/V tiles of ``block_n = 16 * keys`` keys streamed through a
  ``num_stages``-deep ``cp.async`` ring (rows padded by 16 bytes: conflict-free float4 reads);
* S: lane c of a half-warp computes its ``rows`` x ``keys`` scores (keys c, c+16, ...), reading
  float4 slices of Q (broadcast) and K from shared memory: rows*keys FFMAs per 16 bytes pair;
* online softmax in registers: row max over the half-warp with ``shfl.xor`` 1..8, exact
  ``exp2f`` with scale*log2(e) folded in; each lane keeps a partial row sum (added up at the end);
* P goes to the half-warp's own rows of a shared scratch tile, then lane c accumulates
  O[rows, dims of c] += P V with float4 reads of P and V.  A ``__syncwarp`` would order the P
  writes and reads, but ``tvm_storage_sync("warp")`` emits nothing in TVM's CUDA codegen: the
  ordering comes from the two ``__syncthreads`` TVM's ThreadSync pass inserts around P (4 per
  key tile in all; removing those two is a known speed-up left to do);
* epilogue: O / l, LSE = m * scale + ln(l); rows >= Sq are not written.

Causal (top-left aligned, like torch SDPA ``is_causal``): key tiles above the diagonal are not
visited.  Tails in Sq/Sk: zero-filled copies + -inf masks.  Shapes and argument order are those
of ``tvm_flash.compute.flash_forward``: ``flash_fwd(q, k, v, o, lse, scale)``, all sizes
symbolic.

Entry points (the interface of every schedule module): ``supports``, ``default_knobs``,
``check_knobs``, ``schedule``; ``KNOB_SPACE`` for the tuner.
"""

from __future__ import annotations

import math

import tvm
from tvm.script import tirx as T

from tvm_flash.compute import LN2, LOG2E

from .common import MAX_SMEM

__all__ = ["supports", "default_knobs", "check_knobs", "schedule", "forward_ffma", "smem_bytes"]


# What MetaSchedule may choose from (tvm_flash.tune); check_knobs rejects invalid combinations.
KNOB_SPACE = {"num_warps": [4, 8], "rows": [2, 4, 8], "keys": [2, 4], "num_stages": [1, 2]}


def supports(head_dim: int, dtype: str) -> bool:
    """fp32 with a head dim that is a multiple of 16 in [16, 256]."""
    return dtype == "float32" and head_dim % 16 == 0 and 16 <= head_dim <= 256


def smem_bytes(head_dim: int, num_warps: int, rows: int, keys: int, num_stages: int) -> int:
    """Shared memory of one CTA: Q tile, the K/V ring and the P scratch tile (padded rows)."""
    bm, bn, sd = 2 * num_warps * rows, 16 * keys, head_dim + 4
    return 4 * (bm * sd + 2 * num_stages * bn * sd + bm * (bn + 4))


def default_knobs(head_dim: int, dtype: str = "float32", causal: bool = False) -> dict:
    """4 rows x 4 keys per lane (16 FFMAs per pair of float4 reads), 8 warps: 64 x 64 tiles;
    a 32-key tile when the head dim is large (shared memory, registers)."""
    if head_dim > 128:
        return {"num_warps": 8, "rows": 4, "keys": 2, "num_stages": 1}
    return {"num_warps": 8, "rows": 4, "keys": 4, "num_stages": 2}


def check_knobs(head_dim: int, dtype: str, causal: bool, knobs: dict) -> None:
    """Raise ValueError if the knobs (over the defaults) cannot build."""
    k = {**default_knobs(head_dim, dtype, causal), **knobs}
    _check(head_dim, dtype, **k)


def _check(head_dim, dtype, num_warps, rows, keys, num_stages):
    if not supports(head_dim, dtype):
        raise ValueError(f"cuda_ffma takes fp32 with head_dim % 16 == 0 in [16, 256], got {dtype} {head_dim}")
    if num_warps not in (1, 2, 4, 8, 16) or rows < 1 or keys < 1 or num_stages < 1:
        raise ValueError(f"bad knobs num_warps={num_warps} rows={rows} keys={keys} num_stages={num_stages}")
    dims = head_dim // 16
    regs = rows * keys + rows * dims + 4 * rows + 4 * keys
    if regs > 160:
        raise ValueError(f"rows={rows}, keys={keys}, head_dim={head_dim}: {regs} registers of tiles per thread (> 160)")
    if smem_bytes(head_dim, num_warps, rows, keys, num_stages) > MAX_SMEM:
        raise ValueError("tile configuration exceeds 227 KiB of shared memory")


def forward_ffma(head_dim: int, causal: bool, *, num_warps: int = 8, rows: int = 4, keys: int = 4,
                 num_stages: int = 2) -> tvm.tirx.PrimFunc:
    """Build the fp32 forward PrimFunc ``flash_fwd`` (see the module docstring)."""
    _check(head_dim, "float32", num_warps, rows, keys, num_stages)
    D, NW, R, KP, NS = head_dim, num_warps, rows, keys, num_stages
    NT = 32 * NW
    BM = 2 * NW * R  # query rows per CTA
    BN = 16 * KP  # keys per tile
    SD = D + 4  # padded shared row (floats)
    PN = BN + 4  # padded P row (floats)
    CH = D // 4  # float4 chunks per row
    W = 4 if D % 64 == 0 else (2 if D % 32 == 0 else 1)  # width of a lane's output chunk
    NU = D // (16 * W)  # output chunks per lane
    DP = NU * W  # output dims per lane
    K_OFF = BM * SD
    V_OFF = K_OFF + NS * BN * SD
    P_OFF = V_OFF + NS * BN * SD
    SMEM = P_OFF + BM * PN
    Q_CP = BM * CH  # 16-byte copies of the Q tile
    KV_CP = BN * CH  # ... of one K (or V) tile
    NEG_INF = -math.inf
    FULL = 0xFFFFFFFF
    cp_async = T.ptx["cp.async.cg.shared.global"]
    commit = T.ptx["cp.async.commit_group"]
    wait_group = T.ptx["cp.async.wait_group"]

    @T.macro
    def load_kv(smem, k, v, bz, hk, Sk, tile, slot, tx):
        # K/V tile `tile` -> ring slot `slot`; rows past Sk are zero-filled (src-size 0)
        for it in T.unroll((KV_CP + NT - 1) // NT):
            if KV_CP % NT == 0 or it * NT + tx < KV_CP:
                r = (it * NT + tx) // CH
                c = (it * NT + tx) % CH
                kr = tile * BN + r
                ok = T.if_then_else(kr < Sk, T.uint32(16), T.uint32(0))
                so = slot * BN * SD + r * SD + c * 4
                cp_async(T.address_of(smem[K_OFF + so]), T.address_of(k[bz, hk, T.min(kr, Sk - 1), c * 4]), 16, ok)
                cp_async(T.address_of(smem[V_OFF + so]), T.address_of(v[bz, hk, T.min(kr, Sk - 1), c * 4]), 16, ok)

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
        q = T.match_buffer(q_h, (B, Hq, Sq, D), "float32")
        k = T.match_buffer(k_h, (B, Hkv, Sk, D), "float32")
        v = T.match_buffer(v_h, (B, Hkv, Sk, D), "float32")
        o = T.match_buffer(o_h, (B, Hq, Sq, D), "float32")
        lse = T.match_buffer(lse_h, (B, Hq, Sq), "float32")
        for bx in T.thread_binding((Sq + BM - 1) // BM, thread="blockIdx.x"):
            for hq in T.thread_binding(Hq, thread="blockIdx.y"):
                for bz in T.thread_binding(B, thread="blockIdx.z"):
                    smem = T.alloc_buffer((SMEM,), "float32", scope="shared.dyn")
                    for tx in T.thread_binding(NT, thread="threadIdx.x"):
                        qv = T.alloc_buffer((R * 4,), "float32", scope="local")
                        kv = T.alloc_buffer((KP * 4,), "float32", scope="local")
                        pv = T.alloc_buffer((R * 4,), "float32", scope="local")
                        vv = T.alloc_buffer((DP,), "float32", scope="local")
                        s = T.alloc_buffer((R, KP), "float32", scope="local")
                        acc = T.alloc_buffer((R, DP), "float32", scope="local")
                        m_i = T.alloc_buffer((R,), "float32", scope="local")
                        l_i = T.alloc_buffer((R,), "float32", scope="local")
                        red = T.alloc_buffer((1,), "float32", scope="local")
                        mu = T.alloc_buffer((1,), "float32", scope="local")
                        alpha = T.alloc_buffer((1,), "float32", scope="local")
                        # heaviest query tiles first when causal (longest key ranges)
                        m_blk = T.if_then_else(causal, (Sq + BM - 1) // BM - 1 - bx, bx)
                        m0 = m_blk * BM
                        hk = hq // (Hq // Hkv)
                        # index expressions stay inline (meta_var), so float4 alignment is provable
                        c = T.meta_var(tx % 16)  # lane inside the half-warp
                        r0 = T.meta_var((tx // 16) * R)  # first row of this half-warp inside the tile
                        sl2 = scale * T.float32(LOG2E)
                        kv_len = T.if_then_else(causal, T.min(T.min(m0 + BM, Sq), Sk), Sk)
                        n_blk = (kv_len + BN - 1) // BN

                        # ---- Q tile -> shared (zero-filled past Sq) ----
                        for it in T.unroll((Q_CP + NT - 1) // NT):
                            if Q_CP % NT == 0 or it * NT + tx < Q_CP:
                                qr = (it * NT + tx) // CH
                                qc = (it * NT + tx) % CH
                                cp_async(T.address_of(smem[qr * SD + qc * 4]),
                                         T.address_of(q[bz, hq, T.min(m0 + qr, Sq - 1), qc * 4]), 16,
                                         T.if_then_else(m0 + qr < Sq, T.uint32(16), T.uint32(0)))
                        for st in T.unroll(NS - 1):
                            if st < n_blk:
                                load_kv(smem, k, v, bz, hk, Sk, st, st, tx)
                            commit()

                        for i, e in T.grid(R, DP):
                            acc[i, e] = T.float32(0)
                        for i in T.unroll(R):
                            m_i[i] = T.float32(NEG_INF)
                            l_i[i] = T.float32(0)

                        for j in T.serial(n_blk):
                            # everyone is done with tile j-1: its ring slot may be refilled
                            T.tvm_storage_sync("shared")
                            if j + NS - 1 < n_blk:
                                load_kv(smem, k, v, bz, hk, Sk, j + NS - 1, (j + NS - 1) % NS, tx)
                            commit()
                            wait_group(NS - 1)
                            T.tvm_storage_sync("shared")
                            k_base = T.meta_var(K_OFF + (j % NS) * BN * SD)
                            v_base = T.meta_var(V_OFF + (j % NS) * BN * SD)

                            # ---- S = Q K^T: rows r0.. x keys c, c+16, ... ----
                            for i, jj in T.grid(R, KP):
                                s[i, jj] = T.float32(0)
                            for dd in T.unroll(CH):
                                for i in T.unroll(R):
                                    qv[T.ramp(i * 4, 1, 4)] = smem[T.ramp((r0 + i) * SD + dd * 4, 1, 4)]
                                for jj in T.unroll(KP):
                                    kv[T.ramp(jj * 4, 1, 4)] = smem[T.ramp(k_base + (c + 16 * jj) * SD + dd * 4, 1, 4)]
                                for i, jj, e in T.grid(R, KP, 4):
                                    s[i, jj] = s[i, jj] + qv[i * 4 + e] * kv[jj * 4 + e]

                            # ---- masking (only key-tail / diagonal tiles) ----
                            n0 = j * BN
                            if (n0 + BN > Sk) or (causal and n0 + BN - 1 > m0):
                                for i, jj in T.grid(R, KP):
                                    if (n0 + c + 16 * jj >= Sk) or (causal and n0 + c + 16 * jj > m0 + r0 + i):
                                        s[i, jj] = T.float32(NEG_INF)

                            # ---- online softmax ----
                            for i in T.unroll(R):
                                red[0] = m_i[i]
                                for jj in T.unroll(KP):
                                    red[0] = T.max(red[0], s[i, jj])
                                for sh in T.unroll(4):
                                    red[0] = T.max(red[0], T.tvm_warp_shuffle_xor(T.uint32(FULL), red[0], 1 << sh, 32, 32))
                                # a row with nothing visible yet uses 0 as its (finite) reference point
                                mu[0] = T.if_then_else(red[0] == T.float32(NEG_INF), T.float32(0), red[0])
                                alpha[0] = T.exp2((m_i[i] - mu[0]) * sl2)
                                m_i[i] = red[0]
                                red[0] = mu[0] * sl2
                                l_i[i] = l_i[i] * alpha[0]
                                for jj in T.unroll(KP):
                                    s[i, jj] = T.exp2(s[i, jj] * sl2 - red[0])
                                    l_i[i] = l_i[i] + s[i, jj]
                                    smem[P_OFF + (r0 + i) * PN + c + 16 * jj] = s[i, jj]
                                for e in T.unroll(DP):
                                    acc[i, e] = acc[i, e] * alpha[0]
                            T.tvm_storage_sync("warp")

                            # ---- O += P V: rows r0.. x dims of lane c ----
                            for n4 in T.unroll(BN // 4):
                                for i in T.unroll(R):
                                    pv[T.ramp(i * 4, 1, 4)] = smem[T.ramp(P_OFF + (r0 + i) * PN + n4 * 4, 1, 4)]
                                for nn in T.unroll(4):
                                    for u in T.unroll(NU):
                                        if W == 1:
                                            vv[u] = smem[v_base + (n4 * 4 + nn) * SD + c + 16 * u]
                                        else:
                                            vv[T.ramp(u * W, 1, W)] = smem[T.ramp(v_base + (n4 * 4 + nn) * SD + W * c + 16 * W * u, 1, W)]
                                    for i, e in T.grid(R, DP):
                                        acc[i, e] = acc[i, e] + pv[i * 4 + nn] * vv[e]
                            T.tvm_storage_sync("warp")

                        # ---- epilogue: O / l and LSE ----
                        for i in T.unroll(R):
                            red[0] = l_i[i]
                            for sh in T.unroll(4):
                                red[0] = red[0] + T.tvm_warp_shuffle_xor(T.uint32(FULL), red[0], 1 << sh, 32, 32)
                            row = m0 + r0 + i
                            if row < Sq:
                                alpha[0] = T.if_then_else(red[0] > T.float32(0), T.float32(1) / red[0], T.float32(0))
                                for u in T.unroll(NU):
                                    for e in T.unroll(W):
                                        vv[u * W + e] = acc[i, u * W + e] * alpha[0]
                                    if W == 1:
                                        o[bz, hq, row, c + 16 * u] = vv[u]
                                    else:
                                        o[bz, hq, row, T.ramp(W * c + 16 * W * u, 1, W)] = vv[T.ramp(u * W, 1, W)]
                                if c == 0:
                                    lse[bz, hq, row] = (m_i[i] * sl2 + T.log2(red[0])) * T.float32(LN2)
    # fmt: on
    return flash_fwd


def schedule(head_dim: int, dtype: str, causal: bool, **knobs) -> tvm.tirx.PrimFunc:
    """The fp32 FFMA kernel for a workload, default knobs overridden by ``knobs``."""
    k = {**default_knobs(head_dim, dtype, causal), **knobs}
    if dtype != "float32":
        raise ValueError(f"cuda_ffma takes float32, got {dtype}")
    return forward_ffma(head_dim, causal, **{name: int(val) for name, val in k.items()})
