"""The attention backward pass as TensorIR (no schedule applied): dQ, dK, dV from the saved LSE.

Two PrimFuncs, in the tile-and-phase style of ``compute.flash_forward`` (one loop over
tiles, phases as loops over ``num_threads`` cooperating workers):

``flash_bwd_dkdv`` — one tile per (batch, kv head, key tile of ``block_n`` keys)::

    dK, dV = 0
    for each query head g of the kv head's group, each query tile of ``block_m`` rows
            (causal: only tiles with a row at or below the key tile's first key):
        delta = rowsum(dO * O) - dLSE                  # per query row
        P  = exp(scale * Q Kᵀ - LSE)                   # masked entries 0: no S x S matrix
        dP = dO Vᵀ ;  dS = P * (dP - delta)
        dV += Pᵀ dO ;  dK += scale * dSᵀ Q

``flash_bwd_dq`` — one tile per (batch, query head, query tile)::

    dQ = 0
    for each key tile (causal: not above the diagonal):
        P, dS as above ;  dQ += scale * dS K

Accumulation is float32, summed per tile before it joins the running total (shorter
rounding chains over long sequences and large GQA groups); outputs are in the input dtype.  ``dlse`` (the gradient
flowing into the LSE output, zeros when unused) enters through ``delta``:
d LSE_i / d S_ij = P_ij.  Shapes, GQA and causal alignment as in ``compute``.
"""

from __future__ import annotations

from tvm.script import tirx as T

from .compute import LOG2E, check_tiles


def flash_backward(head_dim: int, dtype: str, causal: bool, *, block_m: int = 32, block_n: int = 32,
                   num_threads: int = 32, smem: str = "global", reg: str = "global"):
    """Return (flash_bwd_dkdv, flash_bwd_dq) PrimFuncs for one workload."""
    check_tiles(head_dim, dtype, block_m, block_n, num_threads)
    if block_n > num_threads:
        raise ValueError(f"block_n={block_n} must not exceed num_threads={num_threads}")
    D, BM, BN, NT = head_dim, block_m, block_n, num_threads
    LQ, LKV, LS = BM * D // NT, BN * D // NT, BM * BN // NT
    is_causal = bool(causal)

    # Phases both kernels run, as macros (expanded in place): the query-side rows
    # [row0, row0 + BM) of head hq against the keys [col0, col0 + BN) of kv head hk.

    @T.macro
    def load_rows(q_s, do_s, q, do, b, hq, row0, Sq):
        for tx, i in T.grid(NT, LQ):
            with T.sblock("load_q"):
                T.reads()
                T.writes()
                r: T.let[T.int32] = (i * NT + tx) // D
                c: T.let[T.int32] = (i * NT + tx) % D
                q_s[r, c] = T.if_then_else(row0 + r < Sq, q[b, hq, row0 + r, c], T.cast(0, dtype))
                do_s[r, c] = T.if_then_else(row0 + r < Sq, do[b, hq, row0 + r, c], T.cast(0, dtype))

    @T.macro
    def row_delta(do_s, o, lse, dlse, dl_s, lse_s, b, hq, row0, Sq):
        for tx in T.serial(NT):
            with T.sblock("row_delta"):
                T.reads()
                T.writes()
                acc = T.sblock_alloc_buffer((1,), "float32", scope="local")
                if tx < BM:
                    acc[0] = T.float32(0)
                    if row0 + tx < Sq:
                        for d in T.serial(D):
                            acc[0] = acc[0] + T.cast(do_s[tx, d], "float32") * T.cast(o[b, hq, row0 + tx, d], "float32")
                        dl_s[tx] = acc[0] - dlse[b, hq, row0 + tx]
                        lse_s[tx] = lse[b, hq, row0 + tx]
                    else:
                        dl_s[tx] = T.float32(0)
                        lse_s[tx] = T.float32(0)

    @T.macro
    def load_keys(k_s, v_s, k, v, b, hk, col0, Sk):
        for tx, i in T.grid(NT, LKV):
            with T.sblock("load_kv"):
                T.reads()
                T.writes()
                r: T.let[T.int32] = (i * NT + tx) // D
                c: T.let[T.int32] = (i * NT + tx) % D
                k_s[r, c] = T.if_then_else(col0 + r < Sk, k[b, hk, col0 + r, c], T.cast(0, dtype))
                v_s[r, c] = T.if_then_else(col0 + r < Sk, v[b, hk, col0 + r, c], T.cast(0, dtype))

    @T.macro
    def p_ds(q_s, do_s, k_s, v_s, lse_s, dl_s, p_s, ds_s, row0, col0, Sq, Sk, scale):
        for tx, i in T.grid(NT, LS):
            with T.sblock("p_ds"):
                T.reads()
                T.writes()
                dot = T.sblock_alloc_buffer((2,), "float32", scope="local")
                r: T.let[T.int32] = (i * NT + tx) // BN
                c: T.let[T.int32] = (i * NT + tx) % BN
                dot[0] = T.float32(0)
                dot[1] = T.float32(0)
                for d in T.serial(D):
                    dot[0] = dot[0] + T.cast(q_s[r, d], "float32") * T.cast(k_s[c, d], "float32")
                    dot[1] = dot[1] + T.cast(do_s[r, d], "float32") * T.cast(v_s[c, d], "float32")
                masked = (row0 + r >= Sq) or (col0 + c >= Sk) or (is_causal and col0 + c > row0 + r)
                p_s[r, c] = T.if_then_else(masked, T.float32(0), T.exp2((dot[0] * scale - lse_s[r]) * T.float32(LOG2E)))
                ds_s[r, c] = T.if_then_else(masked, T.float32(0), p_s[r, c] * (dot[1] - dl_s[r]))

    @T.prim_func(s_tir=True)
    def flash_bwd_dkdv(q_h: T.handle, k_h: T.handle, v_h: T.handle, o_h: T.handle, do_h: T.handle,
                       lse_h: T.handle, dlse_h: T.handle, dk_h: T.handle, dv_h: T.handle, scale: T.float32):
        T.func_attr({"global_symbol": "flash_bwd_dkdv", "tirx.noalias": True})
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
        dlse = T.match_buffer(dlse_h, (B, Hq, Sq), "float32")
        dk = T.match_buffer(dk_h, (B, Hkv, Sk, D), dtype)
        dv = T.match_buffer(dv_h, (B, Hkv, Sk, D), dtype)
        for bx in T.serial(B * Hkv * T.ceildiv(Sk, BN)):
            with T.sblock("tile"):
                T.reads()
                T.writes()
                q_s = T.sblock_alloc_buffer((BM, D), dtype, scope=smem)
                do_s = T.sblock_alloc_buffer((BM, D), dtype, scope=smem)
                k_s = T.sblock_alloc_buffer((BN, D), dtype, scope=smem)
                v_s = T.sblock_alloc_buffer((BN, D), dtype, scope=smem)
                p_s = T.sblock_alloc_buffer((BM, BN), "float32", scope=smem)
                ds_s = T.sblock_alloc_buffer((BM, BN), "float32", scope=smem)
                lse_s = T.sblock_alloc_buffer((BM,), "float32", scope=smem)
                dl_s = T.sblock_alloc_buffer((BM,), "float32", scope=smem)
                dk_acc = T.sblock_alloc_buffer((NT, LKV), "float32", scope=reg)
                dv_acc = T.sblock_alloc_buffer((NT, LKV), "float32", scope=reg)
                nt: T.let[T.int32] = bx % T.ceildiv(Sk, BN)
                hk: T.let[T.int32] = bx // T.ceildiv(Sk, BN) % Hkv
                b: T.let[T.int32] = bx // T.ceildiv(Sk, BN) // Hkv
                n0: T.let[T.int32] = nt * BN
                # Causal: query tiles wholly above this key tile (all rows < n0) see none of its keys.
                mt0: T.let[T.int32] = T.if_then_else(is_causal, T.min(n0 // BM, T.ceildiv(Sq, BM)), 0)
                load_keys(k_s, v_s, k, v, b, hk, n0, Sk)
                for tx, i in T.grid(NT, LKV):
                    with T.sblock("init_dkdv"):
                        T.reads()
                        T.writes()
                        dk_acc[tx, i] = T.float32(0)
                        dv_acc[tx, i] = T.float32(0)
                for g, mi in T.grid(Hq // Hkv, T.ceildiv(Sq, BM) - mt0):
                    load_rows(q_s, do_s, q, do, b, hk * (Hq // Hkv) + g, (mt0 + mi) * BM, Sq)
                    row_delta(do_s, o, lse, dlse, dl_s, lse_s, b, hk * (Hq // Hkv) + g, (mt0 + mi) * BM, Sq)
                    p_ds(q_s, do_s, k_s, v_s, lse_s, dl_s, p_s, ds_s, (mt0 + mi) * BM, n0, Sq, Sk, scale)
                    for tx, i in T.grid(NT, LKV):
                        with T.sblock("dkdv"):
                            T.reads()
                            T.writes()
                            part = T.sblock_alloc_buffer((2,), "float32", scope="local")
                            r: T.let[T.int32] = (i * NT + tx) // D
                            c: T.let[T.int32] = (i * NT + tx) % D
                            part[0] = T.float32(0)
                            part[1] = T.float32(0)
                            for m in T.serial(BM):
                                part[0] = part[0] + p_s[m, r] * T.cast(do_s[m, c], "float32")
                                part[1] = part[1] + ds_s[m, r] * T.cast(q_s[m, c], "float32")
                            dv_acc[tx, i] = dv_acc[tx, i] + part[0]  # per-tile partial sums: shorter
                            dk_acc[tx, i] = dk_acc[tx, i] + part[1]  # fp32 chains over long groups
                for tx, i in T.grid(NT, LKV):
                    with T.sblock("store_dkdv"):
                        T.reads()
                        T.writes()
                        r: T.let[T.int32] = (i * NT + tx) // D
                        c: T.let[T.int32] = (i * NT + tx) % D
                        if n0 + r < Sk:
                            dk[b, hk, n0 + r, c] = T.cast(dk_acc[tx, i] * scale, dtype)
                            dv[b, hk, n0 + r, c] = T.cast(dv_acc[tx, i], dtype)

    @T.prim_func(s_tir=True)
    def flash_bwd_dq(q_h: T.handle, k_h: T.handle, v_h: T.handle, o_h: T.handle, do_h: T.handle,
                     lse_h: T.handle, dlse_h: T.handle, dq_h: T.handle, scale: T.float32):
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
        dlse = T.match_buffer(dlse_h, (B, Hq, Sq), "float32")
        dq = T.match_buffer(dq_h, (B, Hq, Sq, D), dtype)
        for bx in T.serial(B * Hq * T.ceildiv(Sq, BM)):
            with T.sblock("tile"):
                T.reads()
                T.writes()
                q_s = T.sblock_alloc_buffer((BM, D), dtype, scope=smem)
                do_s = T.sblock_alloc_buffer((BM, D), dtype, scope=smem)
                k_s = T.sblock_alloc_buffer((BN, D), dtype, scope=smem)
                v_s = T.sblock_alloc_buffer((BN, D), dtype, scope=smem)
                p_s = T.sblock_alloc_buffer((BM, BN), "float32", scope=smem)
                ds_s = T.sblock_alloc_buffer((BM, BN), "float32", scope=smem)
                lse_s = T.sblock_alloc_buffer((BM,), "float32", scope=smem)
                dl_s = T.sblock_alloc_buffer((BM,), "float32", scope=smem)
                dq_acc = T.sblock_alloc_buffer((NT, LQ), "float32", scope=reg)
                mt: T.let[T.int32] = bx % T.ceildiv(Sq, BM)
                hq: T.let[T.int32] = bx // T.ceildiv(Sq, BM) % Hq
                b: T.let[T.int32] = bx // T.ceildiv(Sq, BM) // Hq
                hk: T.let[T.int32] = hq // (Hq // Hkv)
                m0: T.let[T.int32] = mt * BM
                load_rows(q_s, do_s, q, do, b, hq, m0, Sq)
                row_delta(do_s, o, lse, dlse, dl_s, lse_s, b, hq, m0, Sq)
                for tx, i in T.grid(NT, LQ):
                    with T.sblock("init_dq"):
                        T.reads()
                        T.writes()
                        dq_acc[tx, i] = T.float32(0)
                for nt in T.serial(
                    T.if_then_else(
                        is_causal,
                        T.min(T.ceildiv(Sk, BN), T.ceildiv(T.min(m0 + BM, Sq), BN)),
                        T.ceildiv(Sk, BN),
                    )
                ):
                    load_keys(k_s, v_s, k, v, b, hk, nt * BN, Sk)
                    p_ds(q_s, do_s, k_s, v_s, lse_s, dl_s, p_s, ds_s, m0, nt * BN, Sq, Sk, scale)
                    for tx, i in T.grid(NT, LQ):
                        with T.sblock("dq"):
                            T.reads()
                            T.writes()
                            part = T.sblock_alloc_buffer((1,), "float32", scope="local")
                            r: T.let[T.int32] = (i * NT + tx) // D
                            c: T.let[T.int32] = (i * NT + tx) % D
                            part[0] = T.float32(0)
                            for j in T.serial(BN):
                                part[0] = part[0] + ds_s[r, j] * T.cast(k_s[j, c], "float32")
                            dq_acc[tx, i] = dq_acc[tx, i] + part[0]
                for tx, i in T.grid(NT, LQ):
                    with T.sblock("store_dq"):
                        T.reads()
                        T.writes()
                        r: T.let[T.int32] = (i * NT + tx) // D
                        c: T.let[T.int32] = (i * NT + tx) % D
                        if m0 + r < Sq:
                            dq[b, hq, m0 + r, c] = T.cast(dq_acc[tx, i] * scale, dtype)

    return flash_bwd_dkdv, flash_bwd_dq
