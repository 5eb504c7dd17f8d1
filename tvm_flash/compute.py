"""The attention forward pass as a TensorIR computation (no schedule applied).

``flash_forward(...)`` returns an s_tir PrimFunc that computes, for every
(batch, query head, query tile of ``block_m`` rows):

    m, l, acc = -inf, 0, 0                         # running max, sum, output
    for each key/value tile of ``block_n`` keys:   # tiles above the causal diagonal skipped
        S     = scale * log2(e) * Q_tile @ K_tileᵀ  # masked: key >= Sk, or key > query (causal)
        m_new = max(m, rowmax(S))
        P     = exp2(S - m_new)
        alpha = exp2(m - m_new)
        l     = alpha * l + rowsum(P)
        acc   = alpha * acc + P @ V_tile
        m     = m_new
    O = acc / l ;  LSE = (m + log2(l)) * ln(2)

Q, K, V tiles are staged in a tile-local buffer (``smem`` scope: shared memory
on CUDA); S/P is only ever a ``block_m x block_n`` tile, never S x S.  The
work of one tile is written as phases, each a loop over ``num_threads``
cooperating workers (``tx``); element ``e = i * num_threads + tx`` of a tile
belongs to worker ``tx``.  A schedule (``schedules/``) decides what the loops
become: CUDA binds the tile loop to ``blockIdx.x`` and every ``tx`` loop to
``threadIdx.x`` (TVM inserts the barriers between phases); the CPU schedule
runs tiles in parallel and the ``tx`` loops serially.

Shapes follow ``F.scaled_dot_product_attention``: q ``[B, Hq, Sq, D]``,
k/v ``[B, Hkv, Sk, D]`` with ``Hq % Hkv == 0`` (GQA/MQA: query head ``h``
reads kv head ``h // (Hq // Hkv)``), o ``[B, Hq, Sq, D]``, lse ``[B, Hq, Sq]``
float32 (natural log).  B, Hq, Hkv, Sq, Sk are symbolic: one compiled
kernel serves them all.  ``scale`` is a run-time float32 argument.  Causal
masking is top-left aligned (query i sees keys j <= i), as SDPA's is_causal.
"""

from __future__ import annotations

import math

from tvm.script import tirx as T

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

DTYPES = ("float32", "float16", "bfloat16")


def check_tiles(head_dim: int, dtype: str, block_m: int, block_n: int, num_threads: int) -> None:
    """Raise ValueError unless the tile sizes divide evenly among the workers."""
    D, BM, BN, NT = head_dim, block_m, block_n, num_threads
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    for name, size in (("block_m*head_dim", BM * D), ("block_n*head_dim", BN * D), ("block_m*block_n", BM * BN)):
        if size % NT:
            raise ValueError(f"{name}={size} is not a multiple of num_threads={NT}")
    if BM > NT:
        raise ValueError(f"block_m={BM} must not exceed num_threads={NT} (one worker per row)")


def flash_forward(
    head_dim: int,
    dtype: str,
    causal: bool,
    *,
    block_m: int = 32,
    block_n: int = 32,
    num_threads: int = 128,
    smem: str = "shared.dyn",
    reg: str = "local",
):
    """Build the forward PrimFunc ``flash_fwd(q, k, v, o, lse, scale)``.

    ``smem``/``reg`` are the storage scopes of the tile buffers and of the
    per-worker accumulators (a schedule choice that must be made at
    allocation time)."""
    check_tiles(head_dim, dtype, block_m, block_n, num_threads)
    D, BM, BN, NT = head_dim, block_m, block_n, num_threads
    LQ, LKV, LS = BM * D // NT, BN * D // NT, BM * BN // NT
    is_causal = bool(causal)
    NEG_INF = -math.inf

    @T.prim_func(s_tir=True)
    def flash_fwd(q_h: T.handle, k_h: T.handle, v_h: T.handle, o_h: T.handle, lse_h: T.handle, scale: T.float32):
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
        for bx in T.serial(B * Hq * T.ceildiv(Sq, BM)):
            with T.sblock("tile"):
                T.reads()
                T.writes()
                q_s = T.sblock_alloc_buffer((BM, D), dtype, scope=smem)
                k_s = T.sblock_alloc_buffer((BN, D), dtype, scope=smem)
                v_s = T.sblock_alloc_buffer((BN, D), dtype, scope=smem)
                p_s = T.sblock_alloc_buffer((BM, BN), "float32", scope=smem)
                m_s = T.sblock_alloc_buffer((BM,), "float32", scope=smem)
                l_s = T.sblock_alloc_buffer((BM,), "float32", scope=smem)
                a_s = T.sblock_alloc_buffer((BM,), "float32", scope=smem)
                acc = T.sblock_alloc_buffer((NT, LQ), "float32", scope=reg)
                mt: T.let[T.int32] = bx % T.ceildiv(Sq, BM)
                hq: T.let[T.int32] = bx // T.ceildiv(Sq, BM) % Hq
                b: T.let[T.int32] = bx // T.ceildiv(Sq, BM) // Hq
                hk: T.let[T.int32] = hq // (Hq // Hkv)
                m0: T.let[T.int32] = mt * BM
                for tx, i in T.grid(NT, LQ):
                    with T.sblock("load_q"):
                        T.reads()
                        T.writes()
                        r: T.let[T.int32] = (i * NT + tx) // D
                        c: T.let[T.int32] = (i * NT + tx) % D
                        q_s[r, c] = T.if_then_else(m0 + r < Sq, q[b, hq, m0 + r, c], T.cast(0, dtype))
                        acc[tx, i] = T.float32(0)
                for tx in T.serial(NT):
                    with T.sblock("init_rows"):
                        T.reads()
                        T.writes()
                        if tx < BM:
                            m_s[tx] = T.float32(NEG_INF)
                            l_s[tx] = T.float32(0)
                # Causal: key tiles wholly above the diagonal are never visited.
                for nt in T.serial(
                    T.if_then_else(
                        is_causal,
                        T.min(T.ceildiv(Sk, BN), T.ceildiv(T.min(m0 + BM, Sq), BN)),
                        T.ceildiv(Sk, BN),
                    )
                ):
                    for tx, i in T.grid(NT, LKV):
                        with T.sblock("load_kv"):
                            T.reads()
                            T.writes()
                            r: T.let[T.int32] = (i * NT + tx) // D
                            c: T.let[T.int32] = (i * NT + tx) % D
                            k_s[r, c] = T.if_then_else(nt * BN + r < Sk, k[b, hk, nt * BN + r, c], T.cast(0, dtype))
                            v_s[r, c] = T.if_then_else(nt * BN + r < Sk, v[b, hk, nt * BN + r, c], T.cast(0, dtype))
                    for tx, i in T.grid(NT, LS):
                        with T.sblock("qk"):
                            T.reads()
                            T.writes()
                            dot = T.sblock_alloc_buffer((1,), "float32", scope="local")
                            r: T.let[T.int32] = (i * NT + tx) // BN
                            c: T.let[T.int32] = (i * NT + tx) % BN
                            dot[0] = T.float32(0)
                            for d in T.serial(D):
                                dot[0] = dot[0] + T.cast(q_s[r, d], "float32") * T.cast(k_s[c, d], "float32")
                            masked = (nt * BN + c >= Sk) or (is_causal and nt * BN + c > m0 + r)
                            p_s[r, c] = T.if_then_else(masked, T.float32(NEG_INF), dot[0] * (scale * T.float32(LOG2E)))
                    for tx in T.serial(NT):
                        with T.sblock("row_max"):
                            T.reads()
                            T.writes()
                            mx = T.sblock_alloc_buffer((1,), "float32", scope="local")
                            if tx < BM:
                                mx[0] = m_s[tx]
                                for c in T.serial(BN):
                                    mx[0] = T.max(mx[0], p_s[tx, c])
                                a_s[tx] = T.exp2(m_s[tx] - mx[0])
                                m_s[tx] = mx[0]
                    for tx, i in T.grid(NT, LS):
                        with T.sblock("exp"):
                            T.reads()
                            T.writes()
                            r: T.let[T.int32] = (i * NT + tx) // BN
                            c: T.let[T.int32] = (i * NT + tx) % BN
                            p_s[r, c] = T.exp2(p_s[r, c] - m_s[r])
                    for tx in T.serial(NT):
                        with T.sblock("row_sum"):
                            T.reads()
                            T.writes()
                            rs = T.sblock_alloc_buffer((1,), "float32", scope="local")
                            if tx < BM:
                                rs[0] = T.float32(0)
                                for c in T.serial(BN):
                                    rs[0] = rs[0] + p_s[tx, c]
                                l_s[tx] = l_s[tx] * a_s[tx] + rs[0]
                    for tx, i in T.grid(NT, LQ):
                        with T.sblock("pv"):
                            T.reads()
                            T.writes()
                            r: T.let[T.int32] = (i * NT + tx) // D
                            c: T.let[T.int32] = (i * NT + tx) % D
                            acc[tx, i] = acc[tx, i] * a_s[r]
                            for j in T.serial(BN):
                                acc[tx, i] = acc[tx, i] + p_s[r, j] * T.cast(v_s[j, c], "float32")
                for tx, i in T.grid(NT, LQ):
                    with T.sblock("store_o"):
                        T.reads()
                        T.writes()
                        r: T.let[T.int32] = (i * NT + tx) // D
                        c: T.let[T.int32] = (i * NT + tx) % D
                        if m0 + r < Sq:
                            o[b, hq, m0 + r, c] = T.cast(acc[tx, i] / l_s[r], dtype)
                for tx in T.serial(NT):
                    with T.sblock("store_lse"):
                        T.reads()
                        T.writes()
                        if tx < BM and m0 + tx < Sq:
                            lse[b, hq, m0 + tx] = (m_s[tx] + T.log2(l_s[tx])) * T.float32(LN2)

    return flash_fwd
