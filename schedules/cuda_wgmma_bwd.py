"""Hopper (sm_90a) attention backward on ``wgmma`` tensor cores, as TVM TIR (``T.ptx`` dialect).

The two PrimFuncs of ``tvm_flash/compute_backward.py`` (same signatures, same math: dK, dV per
key tile; dQ per query tile; no atomics, so the result is deterministic), with every product on
``wgmma`` and fp32 accumulation.  (With ``dq_accum``, the default at head dim 128 with causal
masking, the dK/dV kernel also computes dQ's partial sums and adds them by atomic bulk
reductions, followed by a convert pass instead of the dQ kernel: ``flash_backward_wgmma``.)
Each GEMM takes one of the two operand forms the forward kernel (``cuda_wgmma``) already uses,
so the tile layout, descriptors and register fragments are the forward's: tiles in shared
memory as 128-byte-swizzled 64-column panels, loaded with ``cp.async``;
an m64nNk16 wgmma with A and B "K-major" from shared memory, or with A from registers (a
packed fp16/bf16 accumulator) and B "MN-major" from shared memory.

``flash_bwd_dkdv``: one CTA per (key tile of ``64 * num_wg`` keys, kv head, batch), one
warpgroup per 64 keys; K and V stay in shared memory, (Q, dO) tiles of ``block_q`` queries of
every query head of the group stream through a ``num_stages`` ring::

    S^T  = K Q^T                 (A: K, B: Q, both K-major)
    dP^T = V dO^T                (A: V, B: dO)
    P^T  = exp2(S^T * scale*log2e - LSE*log2e)   (0 above the diagonal / past Sq)
    dS^T = P^T * (dP^T - delta)  (delta = rowsum(dO * O) - dLSE, per query)
    dV  += P^T dO ; dK += dS^T Q (A: packed P^T / dS^T registers, B: dO / Q MN-major)

delta comes from a first pass, ``flash_bwd_prep`` (once per query row, as FA2's preprocessing
kernel; the two kernels take it in place of dLSE); LSE and delta of the next (Q, dO) tile are
staged in shared memory while the current one runs.  ``flash_bwd_dq``: one CTA per (query tile of ``64 * num_wg`` rows, query head, batch); Q
and dO stay, (K, V) tiles of ``block_n`` keys stream through the ring::

    S = Q K^T ; dP = dO V^T ; P = exp2(S * scale*log2e - LSE*log2e) ; dS = P * (dP - delta)
    dQ += dS K                   (A: packed dS registers, B: K MN-major)

dK and dQ are multiplied by ``scale`` at the end.  Causal (top-left aligned) key/query tiles
wholly above the diagonal are skipped.  Head dims 64 and 128, fp16/bf16; other cases use the
plain CUDA backward (``cuda_simt``).
"""

from __future__ import annotations

import math

import tvm
from tvm.script import tirx as T

from tvm_flash.compute import LOG2E

from .common import MAX_SMEM, PTX_TYPE, asm_call, body_macro, pack_frag_macro, pin_all, tensormap_macro, tma_tile_macro
from .cuda_wgmma import _mbar, _named_bar

__all__ = ["supports", "schedule_backward", "flash_backward_wgmma"]

FULL = 0xFFFFFFFF

# dq_wg_sum: a float4 of shared memory plus four values, in place (hidden from TVM like the stores)
ADD_SHARED_V4_SRC = """
__forceinline__ __device__ void tvm_flash_add_shared_v4(void* p, float a, float b, float c, float d) {
  unsigned s = (unsigned)__cvta_generic_to_shared(p);
  float x, y, z, w;
  asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];" : "=f"(x), "=f"(y), "=f"(z), "=f"(w) : "r"(s) : "memory");
  asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};" :: "r"(s), "f"(x + a), "f"(y + b), "f"(z + c), "f"(w + d) : "memory");
}
"""


def supports(head_dim: int, dtype: str) -> bool:
    """fp16/bf16 with head dim 64 or 128 (dK + dV accumulators of a 256-wide head would not fit)."""
    return dtype in PTX_TYPE and head_dim in (64, 128)


def default_knobs_backward(head_dim: int, causal: bool = False) -> dict:
    """dK/dV: 2 warpgroups (128 keys), 64 queries per step at hd128 (the dK + dV accumulators
    take 128 registers per thread: 234-254 in all, no spill), 128 at hd64; dQ: 2 warpgroups (128 rows), 64
    keys per step, 128 at hd128 with causal masking.  ``lsd_overlap`` on; ``lag`` (3-slot ring)
    at hd128 without causal masking only: +5% there, a loss at hd64, and with causal masking
    ptxas serializes the dK/dV kernel's wgmmas (C7515; the dQ kernel stays clean, but both
    kernels share ``num_stages`` and a 3-slot dQ ring of 128-key tiles at hd128 exceeds shared
    memory) (H200 sweeps, perf-notes backward v2).  ``tma`` (thread 0 loads the tiles by TMA):
    +2 to +16% over cp.async at every shape timed, kernel pair alone on the H200, bf16
    (perf-notes backward v3).  ``dq_accum`` (dQ from the dK/dV kernel, TMA bulk reductions) with
    causal masking: B2 H16 S4096 hd128 349 -> 373 TFLOP/s, seq 16k 424 -> 487, hd64 S4096
    272 -> 283, seq 1024 level; without it a loss of 1-6% (perf-notes backward v5).  Its
    summation order varies between runs: ``deterministic`` turns it off.  At hd64 the dK/dV
    kernel takes 128 queries per step (250 registers, no spill; ``dq_accum`` needs 64): B2 H32
    S4096 312 -> 378 TFLOP/s, causal 283 (with dq_accum) -> 318; +11-21% over seq 512-16k
    (perf-notes backward v9)."""
    lag = head_dim > 64 and not causal
    return {"num_wg": 2, "block_q": 128 if head_dim == 64 else 64, "block_n": 128 if head_dim > 64 and causal else 64,
            "num_stages": 3 if lag else 2, "overlap": 1, "lsd_overlap": 1, "lag": int(lag), "tma": 1,
            "dq_accum": int(causal and head_dim > 64), "dq_wg_sum": 0, "dq_l2_hint": 0, "dq_rotate": 0,
            "dq_first": 0}


def deterministic_knobs(head_dim: int, causal: bool) -> dict:
    """Knobs over the defaults for bitwise-reproducible gradients (``torch.use_deterministic_algorithms``;
    also where ``dq_accum``'s buffer would outgrow 32-bit indexing): the dQ kernel of its own in
    place of ``dq_accum``'s atomic bulk reductions; none where the defaults have no atomics."""
    return {"dq_accum": 0} if default_knobs_backward(head_dim, causal)["dq_accum"] else {}


def _tile_macros(D, LT, cp_async):
    """``load_tile``: a (rows x D) tile of ``src[bz, h, row0:row0+rows, :]`` into shared memory at
    element offset ``off`` as D/64 swizzled panels of rows x 64 (row r's 16-byte chunk c at
    ``r*64 + ((c ^ (r % 8)) * 8)``), rows >= n zero-filled; LT threads, lt this thread's index."""

    def make(rows):
        panel = rows * 64
        iters = (rows * (D // 8) + LT - 1) // LT
        rem = rows * (D // 8) % LT

        @T.macro
        def load_tile(smem, src, bz, h, n, row0, off, lt):
            for it in T.unroll(iters):
                e = it * LT + lt
                if rem == 0 or e < rows * (D // 8):
                    c8 = (e // (8 * rows)) * 8 + e % 8
                    r = (e // 8) % rows
                    cp_async(T.address_of(smem[off + (c8 // 8) * panel + r * 64 + ((c8 % 8) ^ (r % 8)) * 8]),
                             T.address_of(src[bz, h, T.min(row0 + r, n - 1), c8 * 8]), 16,
                             T.if_then_else(row0 + r < n, T.uint32(16), T.uint32(0)))

        return load_tile

    return make


def _check(head_dim, dtype, num_wg, block_q, block_n, num_stages, lag=False, tma=False, dq_accum=False,
           dq_wg_sum=False, dq_l2_hint=False):
    if dq_accum and not (num_wg == 2 and block_q == 64 and not lag):
        # dQ's wgmma is m64 (the 64 queries of a step); two warpgroups split it (hd128: 64
        # columns each, hd64: 64 keys each); lag would leave dK running over the dS^T buffer.
        # (At hd64, where each warpgroup's dQ reads only its own dS^T rows, dq_first with lag was
        # tried: 6-10% slower, perf-notes backward v8)
        raise ValueError("dq_accum needs num_wg=2, block_q=64 and lag=0")
    if dq_wg_sum and not (dq_accum and head_dim == 64):
        raise ValueError("dq_wg_sum needs dq_accum and head dim 64 (where both warpgroups add into one dQ tile)")
    if dq_l2_hint and not dq_accum:
        raise ValueError("dq_l2_hint needs dq_accum")
    if lag and num_stages < 3:
        raise ValueError("lag needs num_stages >= 3 (a slot stays read by the last step's GEMMs)")
    if not supports(head_dim, dtype):
        raise ValueError(f"the wgmma backward needs fp16/bf16 and head dim 64 or 128, got {dtype} d={head_dim}")
    if num_wg not in (1, 2) or num_stages < 2:
        raise ValueError("num_wg must be 1 or 2 and num_stages >= 2")
    if block_q not in (16, 32, 64, 128) or block_n % 16 or not 16 <= block_n <= 128:
        # block_q: the k16 steps of dV / dK and the packing of P^T, dS^T (pairs of 8-column groups)
        raise ValueError("block_q must be 16, 32, 64 or 128, block_n a multiple of 16 in [16, 128]")
    # registers per thread: dK/dV kernel S^T, dP^T (block_q/2 each), packed P^T, dS^T (block_q/4
    # each), dK + dV (head_dim); dQ kernel S, dP (block_n/2 each), packed dS (block_n/4), dQ
    # (head_dim/2); about 30 more for addresses and softmax state, within 255 (tight: hd128 with
    # block_q 64 estimates 254; ptxas uses 240-251 there, no spill)
    # (block_q 128 at hd64 estimates 286; ptxas fits it in 250 registers with tma, 255 without,
    # no spill: S^T and dP^T are not all live beside P^T and dS^T; with lag it serializes the
    # wgmmas, C7512)
    if lag and block_q == 128:
        raise ValueError("lag with block_q 128 exceeds the registers (ptxas serializes the wgmmas)")
    if block_q * 3 // 2 + head_dim + 30 > 255 and (block_q, head_dim) != (128, 64) or block_n * 5 // 4 + head_dim // 2 + 30 > 255:
        raise ValueError(f"block_q={block_q} / block_n={block_n} do not fit the register budget at head dim {head_dim}")
    bars = 8 * num_stages if tma else 0  # an mbarrier per ring slot
    smem_dkdv = 2 * head_dim * (2 * 64 * num_wg + 2 * num_stages * block_q) + 1024 + bars + 16 * block_q  # + lsd
    smem_dkdv += 2 * 64 * num_wg * block_q + 4 * 64 * 64 * num_wg if dq_accum else 0  # dS^T, dQ_part staging
    smem_dq = 2 * head_dim * (2 * 64 * num_wg + 2 * num_stages * block_n) + 1024 + bars
    if max(smem_dkdv, smem_dq) > MAX_SMEM:
        raise ValueError("tile configuration exceeds 227 KiB of shared memory")


def flash_backward_wgmma(head_dim: int, dtype: str, causal: bool, *, num_wg: int = 2, block_q: int = 32,
                         block_n: int = 64, num_stages: int = 2, overlap: bool = True,
                         lsd_overlap: bool = False, lag: bool = False, tma: bool = False, dq_accum: bool = False,
                         dq_wg_sum: bool = False, dq_l2_hint: bool = False, dq_rotate: bool = False,
                         dq_first: bool = False):
    """(flash_bwd_dkdv, flash_bwd_dq) PrimFuncs (module docstring).  ``overlap``: wait for each
    wgmma group only when its result is needed, so the softmax-side work of a step runs beside
    the step's next GEMM (else every group is waited for at once: the first GPU-checked order).
    ``lsd_overlap``: the dK/dV kernel computes the next tile's LSE/delta (global loads) after
    this step's first GEMMs are issued, not before.  ``lag``: a step's last GEMM (dK, dQ) is
    left running into the next step (waited for with that step's S); the ring then prefetches
    ``num_stages - 2`` tiles ahead, so the slot those GEMMs read is not refilled.  ``tma``:
    thread 0 loads every tile by TMA (tensor maps encoded on the host, 128-byte swizzle = the
    panel layout, rows past the end zero-filled), each ring slot's tile completing on the slot's
    mbarrier; threads wait on it instead of on their own ``cp.async`` copies.  ``dq_accum``
    (FA2/FA3's 5-GEMM backward): the dK/dV kernel also computes dQ's share of its keys,
    dQ_part = dS K (dS^T through shared memory, both operands MN-major), stages each
    warpgroup's fp32 64 x 64 tile in shared memory and adds it into a zeroed fp32 ``dq_acc``
    [B, Hq, ceil(Sq/64), 64*D] (per query tile, in the staging layout: ``dq_convert``) by one
    TMA bulk reduction (FA3's design; perf-notes backward v5: 0.28 ms where per-thread
    ``red.global.add`` cost 0.43 at hd128 S4096); the second PrimFunc is then
    ``flash_bwd_dq_convert(dq_acc, dq, scale)`` (dq = dq_acc * scale in the output dtype)
    instead of the dQ kernel, which recomputed S and dP (7 GEMMs in all, now 5).  Summation
    order varies between runs (atomic adds): the default with causal masking only.
    ``dq_wg_sum`` (hd64, where both warpgroups' dQ_part cover the same 64 x 64 tile): warpgroup 0
    stages its part, warpgroup 1 adds its own into it in shared memory and issues one bulk
    reduction (backward v6: 6-14% slower, the barrier of both warpgroups).  ``dq_l2_hint``: the
    bulk reductions carry an L2 evict-last policy (FA3's; no gain on the H200, v6).
    ``dq_rotate``: dK/dV CTA ``bx`` of ``nbx`` walks its query tiles starting at tile
    ``bx * n_qt // nbx`` (wrapping), so the CTAs of one head that run at once add into different
    dQ tiles instead of all into the same one (v7: +2-6% at hd128 without causal masking, a loss
    elsewhere).  ``dq_first``: the dQ GEMM is issued before dK's and its reduction staged and sent
    while dK runs (v8: no change).  All off by default."""
    if dq_rotate and not dq_accum:
        raise ValueError("dq_rotate needs dq_accum")
    if dq_first and not dq_accum or dq_first and dq_wg_sum:
        raise ValueError("dq_first needs dq_accum (and not dq_wg_sum)")

    def qtile(t, i0, n_qt, bx, Sk):
        # the query tile of step t (within its head's n_qt tiles from i0), rotated by dq_rotate
        if dq_rotate:
            return i0 + (t % n_qt + bx * n_qt // ((Sk + BM - 1) // BM)) % n_qt
        return i0 + t % n_qt

    RED = "bulk_reduce_add_hint" if dq_l2_hint else "bulk_reduce_add"
    _check(head_dim, dtype, num_wg, block_q, block_n, num_stages, lag, tma, dq_accum, dq_wg_sum, dq_l2_hint)
    D, NWG, BQ, BN, NS = head_dim, num_wg, block_q, block_n, num_stages
    PF = NS - 1 - int(lag)  # tiles in flight ahead of the one computed
    NT = 128 * NWG
    BM = 64 * NWG  # keys per dK/dV CTA; queries per dQ CTA
    NP = D // 64
    KD = D // 16
    M_PANEL = BM * 64  # the stationary tiles' panel (BM rows)
    Q_PANEL = BQ * 64  # dK/dV kernel: streamed (Q, dO) tiles
    N_PANEL = BN * 64  # dQ kernel: streamed (K, V) tiles
    SBO = 1024 >> 4
    ab = PTX_TYPE[dtype]
    ss_q = T.ptx[f"wgmma.mma_async.sync.aligned.m64n{BQ}k16.f32.{ab}.{ab}"]
    ss_n = T.ptx[f"wgmma.mma_async.sync.aligned.m64n{BN}k16.f32.{ab}.{ab}"]
    rs_d = T.ptx[f"wgmma.mma_async.sync.aligned.m64n{D}k16.f32.{ab}.{ab}"]
    ss_64 = T.ptx[f"wgmma.mma_async.sync.aligned.m64n64k16.f32.{ab}.{ab}"]
    wg_fence = T.ptx["wgmma.fence.sync.aligned"]
    wg_commit = T.ptx["wgmma.commit_group.sync.aligned"]
    wg_wait = T.ptx["wgmma.wait_group.sync.aligned"]
    fence_proxy = T.ptx["fence.proxy.async.shared::cta"]
    cp_async = T.ptx["cp.async.cg.shared.global"]
    commit = T.ptx["cp.async.commit_group"]
    wait_group = T.ptx["cp.async.wait_group"]
    ex2 = T.ptx["ex2.approx.ftz.f32"]
    pack2 = T.ptx[f"cvt.rn.{ab}x2.f32"]
    INF = math.inf
    tiles = _tile_macros(D, NT, cp_async)
    load_m, load_q, load_n = tiles(BM), tiles(BQ), tiles(BN)

    pack_frag = pack_frag_macro(pack2)
    expect_tx = T.ptx["mbarrier.arrive.expect_tx.shared::cta.b64"]
    M_BYTES, Q_BYTES, N_BYTES = NP * M_PANEL * 2, NP * Q_PANEL * 2, NP * N_PANEL * 2  # one tile

    tma_tile = tma_tile_macro(NP)

    @body_macro
    def init_bars(bar0):
        # tma: one mbarrier per ring slot (one arrival: thread 0's expect_tx; then the bytes)
        if tx == 0:
            for i in T.unroll(NS):
                _mbar("mbar_init", T.address_of(smem[bar0 + 4 * i]), 1)
            T.ptx["fence.mbarrier_init.release.cluster"]()
        T.tvm_storage_sync("shared")

    @body_macro
    def wait_slot(bar0, t):
        # tma: ring tile t landed (phase t // NS of its slot's barrier), visible to the async proxy
        _mbar("mbar_wait", T.address_of(smem[bar0 + 4 * (t % NS)]), (t // NS) % 2)
        fence_proxy()

    @body_macro
    def issue_ss(op, acc, n_acc, desc_a, desc_b, slot, panel):
        # acc = A B^T over head_dim, A (this warpgroup's 64 rows of a stationary tile) and B (ring
        # slot `slot`, rows of `panel` elements per 64 columns) K-major from shared memory; committed
        for kd in T.unroll(KD):
            op(*[acc[i] for i in range(n_acc)],
               desc_a + T.uint64(((kd // 4) * M_PANEL * 2 + (kd % 4) * 32) >> 4),
               desc_b + T.uint64(((slot * NP + kd // 4) * panel * 2 + (kd % 4) * 32) >> 4),
               kd > 0, 1, 1, 0, 0)
        wg_commit()

    @body_macro
    def issue_rs(acc, frag, desc_b, slot, panel, kn_count):
        # acc += A B over kn_count k16 steps, A the packed registers `frag`, B (ring slot `slot`)
        # MN-major from shared memory; committed
        for kn in T.unroll(kn_count):
            rs_d(*[acc[i] for i in range(DV_ACC)], frag[kn * 4 + 0], frag[kn * 4 + 1], frag[kn * 4 + 2], frag[kn * 4 + 3],
                 desc_b + T.uint64((slot * NP * panel * 2 + kn * 16 * 128) >> 4), True, 1, 1, 1)
        wg_commit()

    @body_macro
    def store_rows(acc, out32, H, S, bz, h, row0, mul):
        # acc (m64nD layout, this warpgroup's 64 rows from row0) * mul -> out rows < S
        for hh in T.unroll(2):
            row = row0 + wg * 64 + warp * 16 + g + hh * 8
            if row < S:
                for dt in T.unroll(D // 8):
                    pack2(pk[0], acc[dt * 4 + hh * 2 + 1] * mul, acc[dt * 4 + hh * 2] * mul)
                    out32[(((bz * H + h) * S + row) * D + dt * 8 + t4 * 2) // 2] = pk[0]

    # ------------------------------------------------------------------ dK, dV
    SQ_ACC, DV_ACC = BQ // 2, D // 2
    KQ = BQ // 16  # k16 steps of dV / dK (over queries)
    DK_K_OFF, DK_V_OFF = 0, NP * M_PANEL
    DK_Q_OFF = 2 * NP * M_PANEL
    DK_DO_OFF = DK_Q_OFF + NS * NP * Q_PANEL
    DK_DS_OFF = DK_DO_OFF + NS * NP * Q_PANEL  # dq_accum: dS^T (BM keys x BQ = 64 queries, one panel)
    # dq_accum: each warpgroup's dQ_part (64 x 64 fp32, 16 KB = 8192 elements) staged for the
    # bulk reduction, fragment-native: float4 c (dqp[4c:4c+4]) of thread i at floats (c*128 + i)*4
    DK_ST_OFF = DK_DS_OFF + (BM * BQ if dq_accum else 0)
    ST_WG = 64 * 64 * 4 // 2  # one warpgroup's staging tile, in (2-byte) smem elements
    DK_BAR = DK_ST_OFF + (NWG * ST_WG if dq_accum else 0)  # tma: an mbarrier per ring slot (8 bytes)
    # dq_accum: each warpgroup's share of dQ (64 queries x 64 columns): hd128 its 64 columns
    # over all BM keys, hd64 all 64 columns over its own 64 keys (both warpgroups add theirs)
    DQ_SPLIT_N = D > 64
    DQ_KSTEPS = BM // 16 if DQ_SPLIT_N else 4
    DQ_A_WG = 0 if DQ_SPLIT_N else 64 * 64  # per warpgroup: dS^T and K element offsets
    DQ_B_WG = M_PANEL if DQ_SPLIT_N else 64 * 64
    # dq_acc [B, Hq, ceil(Sq/64), 64*D] fp32: one region of 64*D floats per (batch, head, query
    # tile), in the staging layout; warpgroup w adds its tile at float w * DQ_ACC_WG of it (hd128:
    # the two column halves side by side; hd64: both into the one 64 x 64 tile)
    DQ_ACC_WG = 64 * 64 if DQ_SPLIT_N else 0
    DK_SMEM = DK_BAR + (4 * NS if tma else 0)
    @body_macro
    def lse_delta(t, buf):
        # LSE*log2e and delta of (Q, dO) tile t into lsd[buf] (thread i: query row i of the
        # tile); +inf / 0 past Sq (P = 0 there).  Stores TVM does not see (asm_call): its barrier
        # pass would put a __syncthreads between them and this step's loads of the other half
        hq_t = hk * G + t // n_qt
        qrow = qtile(t, i0, n_qt, bx, Sk) * BQ + tx
        if tx < BQ:
            if qrow < Sq:
                asm_call("st_shared_f32", T.address_of(lsd[buf * 2 * BQ + tx]), lse[bz, hq_t, qrow] * T.float32(LOG2E))
                asm_call("st_shared_f32", T.address_of(lsd[buf * 2 * BQ + BQ + tx]), delta[bz, hq_t, qrow])
            else:
                asm_call("st_shared_f32", T.address_of(lsd[buf * 2 * BQ + tx]), T.float32(INF))
                asm_call("st_shared_f32", T.address_of(lsd[buf * 2 * BQ + BQ + tx]), T.float32(0))

    @body_macro
    def load_qdo(t, slot):
        hq_t = hk * G + t // n_qt
        q0 = qtile(t, i0, n_qt, bx, Sk) * BQ
        load_q(smem, q, bz, hq_t, Sq, q0, DK_Q_OFF + slot * NP * Q_PANEL, tx)
        load_q(smem, do, bz, hq_t, Sq, q0, DK_DO_OFF + slot * NP * Q_PANEL, tx)

    @body_macro
    def tma_qdo(t, slot, extra):
        # tma (thread 0): (Q, dO) tile t into ring slot `slot`; the slot's barrier expects its
        # bytes plus `extra` (K and V with tile 0)
        hq_t = hk * G + t // n_qt
        q0 = qtile(t, i0, n_qt, bx, Sk) * BQ
        expect_tx(T.cuda.cvta_generic_to_shared(T.address_of(smem[DK_BAR + 4 * slot])), 2 * Q_BYTES + extra)
        tma_tile(tm_q, DK_Q_OFF + slot * NP * Q_PANEL, Q_PANEL, q0, hq_t, DK_BAR + 4 * slot)
        tma_tile(tm_do, DK_DO_OFF + slot * NP * Q_PANEL, Q_PANEL, q0, hq_t, DK_BAR + 4 * slot)

    @body_macro
    def ds_store():
        # dq_accum: dS^T (packed pairs of adjacent queries, pd) into shared memory as BM key rows
        # of 64 queries (one 128-byte-swizzled panel: row r's 16-byte chunk c at chunk c ^ (r % 8);
        # pd[4kn + j] holds key row warp*16 + g + 8*(j % 2), queries (2kn + j // 2)*8 + 2*t4 + 0..1),
        # before the dK wgmma takes pd as its A operand (registers a wgmma reads may not be
        # accessed until it completes), then visible to the async proxy
        for kn in T.unroll(KQ):
            for j in T.unroll(4):
                asm_call("st_shared_u32", T.address_of(smem[DK_DS_OFF + (wg * 64 + warp * 16 + g + (j % 2) * 8) * 64
                                                 + (((2 * kn + j // 2) ^ g) * 8) + t4 * 2]), pd[kn * 4 + j])
        fence_proxy()

    @body_macro
    def dq_wait_read():
        # dq_accum: the issuing thread's bulk reductions have read their staging tile.  ptxas
        # implements this wait as it does cp.async.wait_group (DEPBAR on one scoreboard, SB0,
        # which counts both kinds of group), so it also waits for all of this thread's cp.async
        # copies: without tma it goes right after the step's own cp.async wait (before the
        # step's first barrier) rather than after the step's prefetch was issued
        if tx % 128 == 0:
            asm_call("bulk_wait_read")

    @body_macro
    def dq_part():
        # dq_accum: once both warpgroups' dS^T rows are there, dQ_part = dS K: A = dS^T and B = K
        # MN-major from shared memory, m64n64, over DQ_KSTEPS k16 steps of keys; committed.  The
        # last step's bulk reduction (dq_reduce) must have read its staging tile before this
        # step's dq_reduce overwrites it: with tma its issuing thread waits for that before this
        # barrier, the last one all of the warpgroup's threads pass before those stores (most of
        # a step after the reduction was issued: it has long finished reading by then).  Without
        # tma the wait is at the top of the step (dq_wait_read)
        if tma:
            dq_wait_read()
        T.tvm_storage_sync("shared")
        wg_fence()
        for kn in T.unroll(DQ_KSTEPS):
            ss_64(*[dqp[i] for i in range(32)], desc[6] + T.uint64((kn * 16 * 128) >> 4),
                  desc[7] + T.uint64((kn * 16 * 128) >> 4), kn > 0, 1, 1, 1, 1)
        wg_commit()

    @body_macro
    def dq_reduce(t):
        # dq_accum: dQ_part (m64n64 layout: thread i's dqp[4c + 2hh + e] is row warp*16 + g + 8*hh,
        # column 8c + 2*t4 + e of this warpgroup's share) into its staging tile as float4 c at
        # (c*128 + i)*4 (a warp's 32 stores: 512 contiguous bytes, no bank conflict), visible to
        # the async proxy; once the warpgroup's 128 threads are past their stores (named barrier
        # 1 + wg; 0 is __syncthreads), its thread 0 adds the tile into dq_acc by one bulk
        # reduction (rows past Sq are the buffer's padding: dS is 0 there)
        if dq_wg_sum:
            # hd64: thread i of both warpgroups holds the same elements, so warpgroup 0 stages
            # its part, then (barrier 3 of both warpgroups) warpgroup 1 adds its own in place and
            # issues the one reduction; warpgroup 0's next stores come after the next step's
            # __syncthreads, which the issuing thread passes only once the reduction has read.
            # Warpgroup 0 needs no proxy fence: warpgroup 1 rewrites every element it stored
            if wg == 0:
                for c in T.unroll(8):
                    asm_call("st_shared_v4", T.address_of(smem[DK_ST_OFF + (c * 128 + tx % 128) * 8]),
                           dqp[c * 4], dqp[c * 4 + 1], dqp[c * 4 + 2], dqp[c * 4 + 3])
            _named_bar("sync", 3, 256)
            if wg == 1:
                for c in T.unroll(8):
                    T.cuda.func_call("tvm_flash_add_shared_v4",
                                     T.address_of(smem[DK_ST_OFF + (c * 128 + tx % 128) * 8]),
                                     dqp[c * 4], dqp[c * 4 + 1], dqp[c * 4 + 2], dqp[c * 4 + 3],
                                     source_code=ADD_SHARED_V4_SRC)
                fence_proxy()
                _named_bar("sync", 2, 128)
                if tx % 128 == 0:
                    asm_call(RED, T.address_of(dq_acc[bz, hk * G + t // n_qt, qtile(t, i0, n_qt, bx, Sk), 0]),
                           T.address_of(smem[DK_ST_OFF]))
        else:
            for c in T.unroll(8):
                asm_call("st_shared_v4", T.address_of(smem[DK_ST_OFF + wg * ST_WG + (c * 128 + tx % 128) * 8]),
                       dqp[c * 4], dqp[c * 4 + 1], dqp[c * 4 + 2], dqp[c * 4 + 3])
            fence_proxy()
            _named_bar("sync", 1 + wg, 128)
            if tx % 128 == 0:
                asm_call(RED, T.address_of(dq_acc[bz, hk * G + t // n_qt, qtile(t, i0, n_qt, bx, Sk), wg * DQ_ACC_WG]),
                       T.address_of(smem[DK_ST_OFF + wg * ST_WG]))

    @body_macro
    def dkdv_step(t, slot, buf):
        # S^T = K Q^T and dP^T = V dO^T, then P^T, dS^T, dV += P^T dO, dK += dS^T Q.  With
        # `overlap`, P^T is computed while dP^T is on the tensor cores and dS^T while dV is
        # (each wgmma group waited for only when its result is needed)
        wg_fence()
        issue_ss(ss_q, s, SQ_ACC, desc[0], desc[2], slot, Q_PANEL)
        issue_ss(ss_q, dp, SQ_ACC, desc[1], desc[3], slot, Q_PANEL)
        if lsd_overlap:
            if t + 1 < n_t:
                lse_delta(t + 1, (t + 1) % 2)
        wg_wait(1 if overlap else 0)  # S^T complete (and, with lag, the last step's dV, dK)
        pin_all(s, SQ_ACC)
        if lag:
            pin_all(dv_acc, DV_ACC)
            pin_all(dk_acc, DV_ACC)
        q0 = qtile(t, i0, n_qt, bx, Sk) * BQ
        for nt, hh, e2 in T.grid(BQ // 8, 2, 2):
            idx = nt * 4 + hh * 2 + e2
            col = nt * 8 + t4 * 2 + e2
            ex2(s[idx], s[idx] * sl2 - lsd[buf * 2 * BQ + col])
            if causal:
                if q0 + col < m0 + wg * 64 + warp * 16 + g + hh * 8:
                    s[idx] = T.float32(0)
            if dq_accum:  # keys past Sk: P^T = 0, or dS^T (finite or not) times K's zero rows would reach dQ
                if m0 + wg * 64 + warp * 16 + g + hh * 8 >= Sk:
                    s[idx] = T.float32(0)
        pack_frag(pp, s, KQ)
        wg_fence()
        issue_rs(dv_acc, pp, desc[5], slot, Q_PANEL, KQ)
        wg_wait(1 if overlap else 0)  # dP^T complete (dV may still run)
        pin_all(dp, SQ_ACC)
        for nt, hh, e2 in T.grid(BQ // 8, 2, 2):
            idx = nt * 4 + hh * 2 + e2
            dp[idx] = s[idx] * (dp[idx] - lsd[buf * 2 * BQ + BQ + nt * 8 + t4 * 2 + e2])
        pack_frag(pd, dp, KQ)
        if dq_accum:
            ds_store()
        if dq_first:
            # dQ_part first, then dK: once dQ_part (and dV) are complete its reduction is staged and
            # issued while dK runs on the tensor cores (reads of wgmma accumulators in the same
            # step, after the wait that completes them: ptxas keeps the wgmmas asynchronous)
            dq_part()
            wg_fence()
            issue_rs(dk_acc, pd, desc[4], slot, Q_PANEL, KQ)
            wg_wait(1)
            pin_all(dqp, 32)
            dq_reduce(t)
        else:
            wg_fence()
            issue_rs(dk_acc, pd, desc[4], slot, Q_PANEL, KQ)
            if dq_accum:
                dq_part()
        if not lag:  # (always so with dq_accum)
            wg_wait(0)
            pin_all(dv_acc, DV_ACC)
            pin_all(dk_acc, DV_ACC)
            if dq_accum and not dq_first:
                pin_all(dqp, 32)
                dq_reduce(t)

    encode = tensormap_macro(D, dtype)

    @body_macro
    def dkdv_grid():
        # one CTA per (key tile, kv head, batch)
        for bx in T.thread_binding((Sk + BM - 1) // BM, thread="blockIdx.x"):
            for hk in T.thread_binding(Hkv, thread="blockIdx.y"):
                for bz in T.thread_binding(B, thread="blockIdx.z"):
                    smem = T.alloc_buffer((DK_SMEM,), dtype, scope="shared.dyn", align=1024)
                    lsd = T.alloc_buffer((4 * BQ,), "float32", scope="shared")
                    for tx in T.thread_binding(NT, thread="threadIdx.x"):
                        s = T.alloc_buffer((SQ_ACC,), "float32", scope="local")
                        dp = T.alloc_buffer((SQ_ACC,), "float32", scope="local")
                        pp = T.alloc_buffer((KQ * 4,), "uint32", scope="local")
                        pd = T.alloc_buffer((KQ * 4,), "uint32", scope="local")
                        dv_acc = T.alloc_buffer((DV_ACC,), "float32", scope="local")
                        dk_acc = T.alloc_buffer((DV_ACC,), "float32", scope="local")
                        desc = T.alloc_buffer((8 if dq_accum else 6,), "uint64", scope="local")
                        dqp = T.alloc_buffer((32 if dq_accum else 1,), "float32", scope="local")
                        pk = T.alloc_buffer((1,), "uint32", scope="local")
                        G = Hq // Hkv
                        m0 = bx * BM
                        # query tiles that see a key of this tile (causal: from the diagonal on)
                        i0 = T.if_then_else(causal, T.min(m0, Sq) // BQ, 0)
                        n_qt = (Sq + BQ - 1) // BQ - i0
                        n_t = G * n_qt
                        wg = tx // 128
                        warp = (tx % 128) // 32
                        lane = tx % 32
                        g = lane // 4
                        t4 = lane % 4
                        sl2 = scale * T.float32(LOG2E)
                        for i in T.serial(DV_ACC):
                            dv_acc[i] = T.float32(0)
                            dk_acc[i] = T.float32(0)
                        # descriptors: K, V (this warpgroup's 64 keys), Q, dO slot 0 K-major, then MN-major
                        T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc[0]), T.address_of(smem[DK_K_OFF + wg * 64 * 64]), 1, SBO, 3)
                        T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc[1]), T.address_of(smem[DK_V_OFF + wg * 64 * 64]), 1, SBO, 3)
                        T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc[2]), T.address_of(smem[DK_Q_OFF]), 1, SBO, 3)
                        T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc[3]), T.address_of(smem[DK_DO_OFF]), 1, SBO, 3)
                        T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc[4]), T.address_of(smem[DK_Q_OFF]), (Q_PANEL * 2) >> 4, SBO, 3)
                        T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc[5]), T.address_of(smem[DK_DO_OFF]), (Q_PANEL * 2) >> 4, SBO, 3)
                        if dq_accum:  # dQ_part: dS^T and K MN-major (this warpgroup's columns / keys)
                            T.cuda.wgmma.encode_matrix_descriptor(
                                T.address_of(desc[6]), T.address_of(smem[DK_DS_OFF + wg * DQ_A_WG]),
                                (BM * BQ * 2) >> 4, SBO, 3)
                            T.cuda.wgmma.encode_matrix_descriptor(
                                T.address_of(desc[7]), T.address_of(smem[DK_K_OFF + wg * DQ_B_WG]),
                                (M_PANEL * 2) >> 4, SBO, 3)
                        if tma:  # thread 0: K, V and the first (Q, dO) tiles (none if no query sees these keys)
                            init_bars(DK_BAR)
                            if tx == 0 and n_t > 0:
                                tma_qdo(0, 0, 2 * M_BYTES)
                                tma_tile(tm_k, DK_K_OFF, M_PANEL, m0, hk, DK_BAR)
                                tma_tile(tm_v, DK_V_OFF, M_PANEL, m0, hk, DK_BAR)
                                for st in T.unroll(PF - 1):
                                    if st + 1 < n_t:
                                        tma_qdo(st + 1, st + 1, 0)
                        else:
                            load_m(smem, k, bz, hk, Sk, m0, DK_K_OFF, tx)
                            load_m(smem, v, bz, hk, Sk, m0, DK_V_OFF, tx)
                            for st in T.unroll(PF):
                                if st < n_t:
                                    load_qdo(st, st)
                                commit()
                        if n_t > 0:
                            lse_delta(0, 0)
                        for t in T.serial(n_t):
                            if tma:
                                wait_slot(DK_BAR, t)  # tile t (and K, V) landed
                            else:
                                wait_group(PF - 1)  # tile t (and K, V) landed: own copies
                                fence_proxy()
                                if dq_accum:  # (dq_part) the last step's dQ staging tile read
                                    dq_wait_read()
                            T.tvm_storage_sync("shared")  # everyone's; everyone past step t-1
                            if tma:
                                if tx == 0 and t + PF < n_t:
                                    tma_qdo(t + PF, (t + PF) % NS, 0)
                            else:
                                if t + PF < n_t:
                                    load_qdo(t + PF, (t + PF) % NS)
                                commit()
                            if not lsd_overlap:
                                if t + 1 < n_t:
                                    lse_delta(t + 1, (t + 1) % 2)
                            dkdv_step(t, t % NS, t % 2)
                        if not tma:
                            wait_group(0)  # no copy in flight at exit (K, V are never waited for when n_t == 0)
                        wg_wait(0)
                        pin_all(dv_acc, DV_ACC)
                        pin_all(dk_acc, DV_ACC)
                        store_rows(dv_acc, dv32, Hkv, Sk, bz, hk, m0, T.float32(1))
                        store_rows(dk_acc, dk32, Hkv, Sk, bz, hk, m0, scale)
                        if dq_accum:
                            if tx % 128 == 0:  # the last bulk reduction done (its staging tile read) before exit
                                asm_call("bulk_wait")

    @body_macro
    def dkdv_entry():
        # the dK/dV PrimFunc's body (two signatures: with dq_accum, dq_acc comes last but one)
        B = T.int32()
        Hq = T.int32()
        Hkv = T.int32()
        Sq = T.int32()
        Sk = T.int32()
        q = T.match_buffer(q_h, (B, Hq, Sq, D), dtype)
        k = T.match_buffer(k_h, (B, Hkv, Sk, D), dtype)
        v = T.match_buffer(v_h, (B, Hkv, Sk, D), dtype)
        o = T.match_buffer(o_h, (B, Hq, Sq, D), dtype)
        do = T.match_buffer(do_h, (B, Hq, Sq, D), dtype)
        lse = T.match_buffer(lse_h, (B, Hq, Sq), "float32")
        delta = T.match_buffer(delta_h, (B, Hq, Sq), "float32")
        dk = T.match_buffer(dk_h, (B, Hkv, Sk, D), dtype)
        dv = T.match_buffer(dv_h, (B, Hkv, Sk, D), dtype)
        if dq_accum:
            dq_acc = T.match_buffer(dq_acc_h, (B, Hq, (Sq + 63) // 64, 64 * D), "float32")
        dk32 = T.decl_buffer((B * Hkv * Sk * (D // 2),), "uint32", data=dk.data)
        dv32 = T.decl_buffer((B * Hkv * Sk * (D // 2),), "uint32", data=dv.data)
        if tma:
            tm_q = T.Bind(T.tvm_stack_alloca("tensormap", 1))
            encode(tm_q, q, Sq, Hq, BQ)
            tm_do = T.Bind(T.tvm_stack_alloca("tensormap", 1))
            encode(tm_do, do, Sq, Hq, BQ)
            tm_k = T.Bind(T.tvm_stack_alloca("tensormap", 1))
            encode(tm_k, k, Sk, Hkv, BM)
            tm_v = T.Bind(T.tvm_stack_alloca("tensormap", 1))
            encode(tm_v, v, Sk, Hkv, BM)
            dkdv_grid()
        else:
            dkdv_grid()

    # fmt: off
    if dq_accum:
        @T.prim_func
        def flash_bwd_dkdv(q_h: T.handle, k_h: T.handle, v_h: T.handle, o_h: T.handle, do_h: T.handle,
                           lse_h: T.handle, delta_h: T.handle, dk_h: T.handle, dv_h: T.handle, dq_acc_h: T.handle,
                           scale: T.float32):
            T.func_attr({"global_symbol": "flash_bwd_dkdv", "tirx.noalias": True})
            dkdv_entry()
    else:
        @T.prim_func
        def flash_bwd_dkdv(q_h: T.handle, k_h: T.handle, v_h: T.handle, o_h: T.handle, do_h: T.handle,
                           lse_h: T.handle, delta_h: T.handle, dk_h: T.handle, dv_h: T.handle, scale: T.float32):
            T.func_attr({"global_symbol": "flash_bwd_dkdv", "tirx.noalias": True})
            dkdv_entry()

    # ------------------------------------------------------------------ dQ
    SN_ACC = BN // 2
    KN = BN // 16
    DQ_Q_OFF, DQ_DO_OFF = 0, NP * M_PANEL
    DQ_K_OFF = 2 * NP * M_PANEL
    DQ_V_OFF = DQ_K_OFF + NS * NP * N_PANEL
    DQ_BAR = DQ_V_OFF + NS * NP * N_PANEL
    DQ_SMEM = DQ_BAR + (4 * NS if tma else 0)

    @body_macro
    def tma_kv(j, slot, extra):
        # tma (thread 0): (K, V) tile j into ring slot `slot` (+ `extra` bytes: Q and dO with tile 0)
        expect_tx(T.cuda.cvta_generic_to_shared(T.address_of(smem[DQ_BAR + 4 * slot])), 2 * N_BYTES + extra)
        tma_tile(tm_k, DQ_K_OFF + slot * NP * N_PANEL, N_PANEL, j * BN, hk, DQ_BAR + 4 * slot)
        tma_tile(tm_v, DQ_V_OFF + slot * NP * N_PANEL, N_PANEL, j * BN, hk, DQ_BAR + 4 * slot)

    @body_macro
    def dq_step(j, slot):
        # S = Q K^T and dP = dO V^T, then P (with `overlap`: while dP is on the tensor cores),
        # dS, dQ += dS K
        wg_fence()
        issue_ss(ss_n, s, SN_ACC, desc[0], desc[2], slot, N_PANEL)
        issue_ss(ss_n, dp, SN_ACC, desc[1], desc[3], slot, N_PANEL)
        wg_wait(1 if overlap else 0)  # S complete (and, with lag, the last step's dQ)
        pin_all(s, SN_ACC)
        if lag:
            pin_all(dq_acc, DV_ACC)
        n0 = j * BN
        for nt, hh, e2 in T.grid(BN // 8, 2, 2):
            idx = nt * 4 + hh * 2 + e2
            col = n0 + nt * 8 + t4 * 2 + e2
            ex2(s[idx], s[idx] * sl2 - rl[hh])
            if (col >= Sk) or (causal and col > m0 + wg * 64 + warp * 16 + g + hh * 8):
                s[idx] = T.float32(0)
        wg_wait(0)  # dP complete
        pin_all(dp, SN_ACC)
        for nt, hh, e2 in T.grid(BN // 8, 2, 2):
            dp[nt * 4 + hh * 2 + e2] = s[nt * 4 + hh * 2 + e2] * (dp[nt * 4 + hh * 2 + e2] - rd[hh])
        pack_frag(pd, dp, KN)
        wg_fence()
        issue_rs(dq_acc, pd, desc[4], slot, N_PANEL, KN)
        if not lag:
            wg_wait(0)
            pin_all(dq_acc, DV_ACC)

    @body_macro
    def dq_grid():
        # one CTA per (query tile, query head, batch)
        for bx in T.thread_binding((Sq + BM - 1) // BM, thread="blockIdx.x"):
            for hq in T.thread_binding(Hq, thread="blockIdx.y"):
                for bz in T.thread_binding(B, thread="blockIdx.z"):
                    smem = T.alloc_buffer((DQ_SMEM,), dtype, scope="shared.dyn", align=1024)
                    for tx in T.thread_binding(NT, thread="threadIdx.x"):
                        s = T.alloc_buffer((SN_ACC,), "float32", scope="local")
                        dp = T.alloc_buffer((SN_ACC,), "float32", scope="local")
                        pd = T.alloc_buffer((KN * 4,), "uint32", scope="local")
                        dq_acc = T.alloc_buffer((DV_ACC,), "float32", scope="local")
                        desc = T.alloc_buffer((5,), "uint64", scope="local")
                        rl = T.alloc_buffer((2,), "float32", scope="local")
                        rd = T.alloc_buffer((2,), "float32", scope="local")
                        pk = T.alloc_buffer((1,), "uint32", scope="local")
                        # causal: the heaviest query tiles first, as the forward
                        m0 = T.if_then_else(causal, (Sq + BM - 1) // BM - 1 - bx, bx) * BM
                        hk = hq // (Hq // Hkv)
                        kv_len = T.if_then_else(causal, T.min(T.min(m0 + BM, Sq), Sk), Sk)
                        n_blk = (kv_len + BN - 1) // BN
                        wg = tx // 128
                        warp = (tx % 128) // 32
                        lane = tx % 32
                        g = lane // 4
                        t4 = lane % 4
                        sl2 = scale * T.float32(LOG2E)
                        for i in T.serial(DV_ACC):
                            dq_acc[i] = T.float32(0)
                        T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc[0]), T.address_of(smem[DQ_Q_OFF + wg * 64 * 64]), 1, SBO, 3)
                        T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc[1]), T.address_of(smem[DQ_DO_OFF + wg * 64 * 64]), 1, SBO, 3)
                        T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc[2]), T.address_of(smem[DQ_K_OFF]), 1, SBO, 3)
                        T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc[3]), T.address_of(smem[DQ_V_OFF]), 1, SBO, 3)
                        T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc[4]), T.address_of(smem[DQ_K_OFF]), (N_PANEL * 2) >> 4, SBO, 3)
                        if tma:  # thread 0: Q, dO and the first (K, V) tiles
                            init_bars(DQ_BAR)
                            if tx == 0:
                                tma_kv(0, 0, 2 * M_BYTES)
                                tma_tile(tm_q, DQ_Q_OFF, M_PANEL, m0, hq, DQ_BAR)
                                tma_tile(tm_do, DQ_DO_OFF, M_PANEL, m0, hq, DQ_BAR)
                                for st in T.unroll(PF - 1):
                                    if st + 1 < n_blk:
                                        tma_kv(st + 1, st + 1, 0)
                        else:
                            load_m(smem, q, bz, hq, Sq, m0, DQ_Q_OFF, tx)
                            load_m(smem, do, bz, hq, Sq, m0, DQ_DO_OFF, tx)
                            for st in T.unroll(PF):
                                if st < n_blk:
                                    load_n(smem, k, bz, hk, Sk, st * BN, DQ_K_OFF + st * NP * N_PANEL, tx)
                                    load_n(smem, v, bz, hk, Sk, st * BN, DQ_V_OFF + st * NP * N_PANEL, tx)
                                commit()
                        # this thread's two rows: LSE*log2e and delta
                        for hh in T.unroll(2):
                            row = m0 + wg * 64 + warp * 16 + g + hh * 8
                            rl[hh] = T.if_then_else(row < Sq, lse[bz, hq, T.min(row, Sq - 1)] * T.float32(LOG2E), T.float32(INF))
                            rd[hh] = T.if_then_else(row < Sq, delta[bz, hq, T.min(row, Sq - 1)], T.float32(0))
                        for j in T.serial(n_blk):
                            if tma:
                                wait_slot(DQ_BAR, j)
                            else:
                                wait_group(PF - 1)
                                fence_proxy()
                            T.tvm_storage_sync("shared")
                            if tma:
                                if tx == 0 and j + PF < n_blk:
                                    tma_kv(j + PF, (j + PF) % NS, 0)
                            else:
                                if j + PF < n_blk:
                                    load_n(smem, k, bz, hk, Sk, (j + PF) * BN, DQ_K_OFF + ((j + PF) % NS) * NP * N_PANEL, tx)
                                    load_n(smem, v, bz, hk, Sk, (j + PF) * BN, DQ_V_OFF + ((j + PF) % NS) * NP * N_PANEL, tx)
                                commit()
                            dq_step(j, j % NS)
                        if not tma:
                            wait_group(0)
                        wg_wait(0)
                        pin_all(dq_acc, DV_ACC)
                        store_rows(dq_acc, dq32, Hq, Sq, bz, hq, m0, scale)

    @T.prim_func
    def flash_bwd_dq(q_h: T.handle, k_h: T.handle, v_h: T.handle, o_h: T.handle, do_h: T.handle,
                     lse_h: T.handle, delta_h: T.handle, dq_h: T.handle, scale: T.float32):
        T.func_attr({"global_symbol": "flash_bwd_dq", "tirx.noalias": True})
        B = T.int32()
        Hq = T.int32()
        Hkv = T.int32()
        Sq = T.int32()
        Sk = T.int32()
        q = T.match_buffer(q_h, (B, Hq, Sq, D), dtype)
        k = T.match_buffer(k_h, (B, Hkv, Sk, D), dtype)
        v = T.match_buffer(v_h, (B, Hkv, Sk, D), dtype)
        o = T.match_buffer(o_h, (B, Hq, Sq, D), dtype)
        do = T.match_buffer(do_h, (B, Hq, Sq, D), dtype)
        lse = T.match_buffer(lse_h, (B, Hq, Sq), "float32")
        delta = T.match_buffer(delta_h, (B, Hq, Sq), "float32")
        dq = T.match_buffer(dq_h, (B, Hq, Sq, D), dtype)
        dq32 = T.decl_buffer((B * Hq * Sq * (D // 2),), "uint32", data=dq.data)
        if tma:
            tm_q = T.Bind(T.tvm_stack_alloca("tensormap", 1))
            encode(tm_q, q, Sq, Hq, BM)
            tm_do = T.Bind(T.tvm_stack_alloca("tensormap", 1))
            encode(tm_do, do, Sq, Hq, BM)
            tm_k = T.Bind(T.tvm_stack_alloca("tensormap", 1))
            encode(tm_k, k, Sk, Hkv, BN)
            tm_v = T.Bind(T.tvm_stack_alloca("tensormap", 1))
            encode(tm_v, v, Sk, Hkv, BN)
            dq_grid()
        else:
            dq_grid()
    # fmt: on
    if dq_accum:
        return flash_bwd_dkdv, dq_convert(head_dim, dtype)
    return flash_bwd_dkdv, flash_bwd_dq


def delta_pass(head_dim: int, dtype: str):
    """``flash_bwd_prep(o, do, dlse, delta)``: delta = rowsum(dO * O) - dLSE in fp32, once per
    query row (FA2's preprocessing kernel; the dK/dV kernel would otherwise recompute it in
    every key-tile CTA).  8 threads per row, each summing every 8th element, shuffle-reduced."""
    D, TPR, NT = head_dim, 8, 256
    ROWS = NT // TPR

    # fmt: off
    @T.prim_func
    def flash_bwd_prep(o_h: T.handle, do_h: T.handle, dlse_h: T.handle, delta_h: T.handle):
        T.func_attr({"global_symbol": "flash_bwd_prep", "tirx.noalias": True})
        B = T.int32()
        Hq = T.int32()
        Sq = T.int32()
        o = T.match_buffer(o_h, (B, Hq, Sq, D), dtype)
        do = T.match_buffer(do_h, (B, Hq, Sq, D), dtype)
        dlse = T.match_buffer(dlse_h, (B, Hq, Sq), "float32")
        delta = T.match_buffer(delta_h, (B, Hq, Sq), "float32")
        o1 = T.decl_buffer((B * Hq * Sq * D,), dtype, data=o.data)
        do1 = T.decl_buffer((B * Hq * Sq * D,), dtype, data=do.data)
        dlse1 = T.decl_buffer((B * Hq * Sq,), "float32", data=dlse.data)
        delta1 = T.decl_buffer((B * Hq * Sq,), "float32", data=delta.data)
        for bx in T.thread_binding((B * Hq * Sq + ROWS - 1) // ROWS, thread="blockIdx.x"):
            for tx in T.thread_binding(NT, thread="threadIdx.x"):
                red = T.alloc_buffer((1,), "float32", scope="local")
                row = bx * ROWS + tx // TPR
                red[0] = T.float32(0)
                if row < B * Hq * Sq:
                    for d in T.unroll(D // TPR):
                        red[0] = red[0] + T.Cast("float32", do1[row * D + d * TPR + tx % TPR]) * T.Cast(
                            "float32", o1[row * D + d * TPR + tx % TPR])
                for sh in T.unroll(3):
                    red[0] = red[0] + T.tvm_warp_shuffle_xor(T.uint32(FULL), red[0], 1 << sh, 32, 32)
                if tx % TPR == 0 and row < B * Hq * Sq:
                    delta1[row] = red[0] - dlse1[row]
    # fmt: on
    return flash_bwd_prep


def dq_convert(head_dim: int, dtype: str):
    """``flash_bwd_dq_convert(dq_acc, dq, scale)`` (``dq_accum``): dq = dq_acc * scale in the
    output dtype, dq_acc [B, Hq, ceil(Sq/64), 64*D] in the dK/dV kernel's staging layout (per
    query tile: D/64 tiles of 64 rows x 64 columns; float4 c of thread i of a tile holds rows
    r = (i//32)*16 + (i%32)//4 and r + 8, columns 8c + 2*(i%4) + 0..1).  One float4 per thread
    (coalesced reads), two packed pairs out."""
    D, NT = head_dim, 256
    F4 = 16 * D  # float4 per query tile
    pack2 = T.ptx[f"cvt.rn.{PTX_TYPE[dtype]}x2.f32"]

    # fmt: off
    @T.prim_func
    def flash_bwd_dq_convert(acc_h: T.handle, dq_h: T.handle, scale: T.float32):
        T.func_attr({"global_symbol": "flash_bwd_dq_convert", "tirx.noalias": True})
        B = T.int32()
        Hq = T.int32()
        Sq = T.int32()
        NQT = T.int32()
        acc = T.match_buffer(acc_h, (B, Hq, NQT, 64 * D), "float32")
        dq = T.match_buffer(dq_h, (B, Hq, Sq, D), dtype)
        acc1 = T.decl_buffer((B * Hq * NQT * 64 * D,), "float32", data=acc.data)
        dq32 = T.decl_buffer((B * Hq * Sq * (D // 2),), "uint32", data=dq.data)
        for bx in T.thread_binding((B * Hq * NQT * F4 + NT - 1) // NT, thread="blockIdx.x"):
            for tx in T.thread_binding(NT, thread="threadIdx.x"):
                v = T.alloc_buffer((4,), "float32", scope="local")
                pk = T.alloc_buffer((1,), "uint32", scope="local")
                f = bx * NT + tx
                if f < B * Hq * NQT * F4:
                    for e in T.vectorized(4):
                        v[e] = acc1[f * 4 + e]
                    i = f % 128
                    row = (f // F4) % NQT * 64 + (i // 32) * 16 + (i % 32) // 4
                    col = (f % F4) // 1024 * 64 + (f % 1024) // 128 * 8 + (i % 4) * 2
                    for hh in T.unroll(2):
                        if row + hh * 8 < Sq:
                            pack2(pk[0], v[hh * 2 + 1] * scale, v[hh * 2] * scale)
                            dq32[((f // (NQT * F4) * Sq + row + hh * 8) * D + col) // 2] = pk[0]
    # fmt: on
    return flash_bwd_dq_convert


def schedule_backward(head_dim: int, dtype: str, causal: bool, **knobs) -> dict:
    """{"flash_bwd_prep": ..., "flash_bwd_dkdv": ..., "flash_bwd_dq": ...} for the wgmma backward
    (the last two take delta from the first in place of dLSE); with ``dq_accum``
    "flash_bwd_dq_convert" in place of "flash_bwd_dq" (``tvm_flash.build.BackwardKernels``)."""
    k = {**default_knobs_backward(head_dim, causal), **knobs}
    if k["dq_accum"] and "lag" not in knobs:  # a default lag is dropped: dq_accum rules it out
        k["lag"] = 0
    if k["dq_accum"] and "block_q" not in knobs:  # so is hd64's default of 128 queries per step
        k["block_q"] = 64
    for name in ("overlap", "lsd_overlap", "lag", "tma", "dq_accum", "dq_wg_sum", "dq_l2_hint", "dq_rotate",
                 "dq_first"):
        k[name] = bool(k[name])
    dkdv, dq = flash_backward_wgmma(head_dim, dtype, causal, **k)
    return {"flash_bwd_prep": delta_pass(head_dim, dtype), "flash_bwd_dkdv": dkdv,
            "flash_bwd_dq_convert" if k["dq_accum"] else "flash_bwd_dq": dq}
