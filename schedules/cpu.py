"""CPU (LLVM) schedules of the forward and backward.

Forward, two kernels (knob ``vectorized``):
- ``vectorized=1`` (default): ``forward_vectorized``, a hand-written kernel for the CPU's vector
  units (see its docstring); built for the host CPU's instruction set at first use;
- ``vectorized=0``: the generic compute (``tvm_flash.compute``) with query tiles run in parallel
  and each tile's phases serially (the workers ``tx`` become a serial loop; short per-worker
  element loops are unrolled).  Scalar code, kept as the tunable reference schedule.
Backward: ``backward_vectorized``, vector code of the same kind (the generic backward phases
of ``tvm_flash.compute_backward`` still serve the CUDA FFMA schedule).
"""

import math

import tvm
from tvm.script import tirx as T

from tvm_flash.compute import LN2, LOG2E, check_tiles, flash_forward

from .common import phase_loops, tile_loop

_EXP2_TAYLOR = [math.log(2) ** i / math.factorial(i) for i in range(8)]  # 2^f = sum (f ln2)^i / i!
_RB = 4  # rows (keys of the forward's S^T) per register block of the vectorized kernels


# What MetaSchedule may choose from (tvm_flash.tune); invalid combinations fail to build.
KNOB_SPACE = {"block_m": [16, 32, 64], "block_n": [16, 32, 64], "num_threads": [16, 32, 64], "vectorized": [0, 1]}


def default_knobs(head_dim: int, dtype: str) -> dict:
    # vectorized kernel: 64 query rows x 64 keys, the best of block_m, block_n in {32, 64, 128}
    # on the 2-core CI machine (fp32 B1 H8 seq 1024, S^T kernel: 93 / 96 GFLOP/s at hd64 / hd128;
    # 64 x 128: 94 / 91, 128 x 64: 84 / 86, 32 x 64: 90 / 92)
    return {"block_m": 64, "block_n": 64, "num_threads": 64, "vectorized": 1}


def check_vectorized(head_dim: int, dtype: str, block_m: int, block_n: int) -> None:
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    if block_m % _RB or block_n % _RB:
        raise ValueError(f"block_m={block_m} and block_n={block_n} must be multiples of {_RB} (register blocks)")


def check_knobs(head_dim: int, dtype: str, causal: bool, knobs: dict) -> None:
    """Raise ValueError if the knobs (over the defaults) cannot build (cheap: no IR built).
    ``num_threads`` is checked for both kernels (the vectorized one ignores it) so that one
    knob set means one valid point of the space whichever kernel it selects."""
    k = {**default_knobs(head_dim, dtype), **knobs}
    check_tiles(head_dim, dtype, k["block_m"], k["block_n"], k["num_threads"])
    if k["vectorized"]:
        check_vectorized(head_dim, dtype, k["block_m"], k["block_n"])


def schedule(head_dim: int, dtype: str, causal: bool, **knobs):
    """Return the scheduled PrimFunc for the CPU."""
    k = {**default_knobs(head_dim, dtype), **knobs}
    if k.pop("vectorized"):
        return forward_vectorized(head_dim, dtype, causal, block_m=k["block_m"], block_n=k["block_n"])
    func = flash_forward(head_dim, dtype, causal, smem="global", reg="global", **k)
    sch = tvm.s_tir.Schedule(func)
    sch.parallel(tile_loop(sch))
    for _, _, i in phase_loops(sch):
        if i is not None and sch.get(i).extent.value <= 16:
            sch.unroll(i)
    return sch.mod["main"]


def schedule_backward(head_dim: int, dtype: str, causal: bool, **knobs) -> dict:
    """The backward PrimFuncs for the CPU (``backward_vectorized``; ``block_m``/``block_n``
    knobs apply).  Returns {name: PrimFunc} for ``flash_bwd_dkdv`` and ``flash_bwd_dq``."""
    k = {"block_m": 64, "block_n": 64, **{n: knobs[n] for n in ("block_m", "block_n") if n in knobs}}
    return backward_vectorized(head_dim, dtype, causal, **k)


def forward_vectorized(head_dim: int, dtype: str, causal: bool, *, block_m: int = 64, block_n: int = 64):
    """The CPU forward as its own kernel: one parallel task per (batch, head, query tile of
    ``block_m`` rows), fp32 inside (fp16/bf16 converted on load and store).  The Q tile is stored
    transposed once per task, so Sᵀ = K Qᵀ is a vector FMA across queries, register-blocked over
    ``_RB`` keys (no per-key-tile transpose), and the online softmax runs down the columns of
    Sᵀ: each query's max and sum are vector ops across queries (no horizontal reductions);
    O += P V is a vector FMA across D, register-blocked over rows; a vectorizable exp2."""
    check_vectorized(head_dim, dtype, block_m, block_n)
    # rows per register block of O += P V: about 16 vector registers of accumulators (D / 16 each)
    RBO = 4 if head_dim <= 64 else 2 if head_dim <= 128 else 1  # divides block_m (a multiple of 4)
    D, BM, BN, RB = head_dim, block_m, block_n, _RB
    NEG_INF = -math.inf
    load_kv_rows = _kv_rows_macro(D, BN)

    @T.prim_func
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
        for task in T.parallel(B * Hq * ((Sq + BM - 1) // BM)):
            qt = T.alloc_buffer((D, BM), "float32")
            ks = T.alloc_buffer((BN, D), "float32")
            vs = T.alloc_buffer((BN, D), "float32")
            st = T.alloc_buffer((BN, BM), "float32")
            acc = T.alloc_buffer((BM, D), "float32")
            m_i = T.alloc_buffer((BM,), "float32")
            l_i = T.alloc_buffer((BM,), "float32")
            mx = T.alloc_buffer((BM,), "float32")
            mu = T.alloc_buffer((BM,), "float32")
            al = T.alloc_buffer((BM,), "float32")
            nmt = (Sq + BM - 1) // BM
            mt = task % nmt
            hq = task // nmt % Hq
            b = task // nmt // Hq
            hk = hq // (Hq // Hkv)
            m0 = mt * BM
            sl2 = scale * T.float32(LOG2E)
            for i in T.serial(BM):
                for d in T.serial(D):
                    qt[d, i] = T.if_then_else(m0 + i < Sq, T.cast(q[b, hq, T.min(m0 + i, Sq - 1), d], "float32"), T.float32(0)) * sl2
                for d in T.vectorized(D):
                    acc[i, d] = T.float32(0)
            for i in T.vectorized(BM):
                m_i[i] = T.float32(NEG_INF)
                l_i[i] = T.float32(0)
            kv_len = T.if_then_else(causal, T.min(T.min(m0 + BM, Sq), Sk), Sk)
            for jt in T.serial((kv_len + BN - 1) // BN):
                n0 = jt * BN
                load_kv_rows(ks, vs, k, v, b, hk, n0, Sk)
                # Sᵀ = K Qᵀ, register blocks of RB keys x block_m queries
                for jo in T.serial(BN // RB):
                    for jj in T.unroll(RB):
                        for i in T.vectorized(BM):
                            st[jo * RB + jj, i] = T.float32(0)
                    for d in T.serial(D):
                        for jj in T.unroll(RB):
                            for i in T.vectorized(BM):
                                st[jo * RB + jj, i] = st[jo * RB + jj, i] + ks[jo * RB + jj, d] * qt[d, i]
                # -inf past Sk and above the diagonal; each query's new max, O's rescale factor,
                # P = exp2(S - max) and the running sum: vector ops across queries
                for i in T.vectorized(BM):
                    mx[i] = m_i[i]
                for j in T.serial(BN):
                    for i in T.vectorized(BM):
                        st[j, i] = T.if_then_else((n0 + j >= Sk) or (causal and n0 + j > m0 + i), T.float32(NEG_INF), st[j, i])
                        mx[i] = T.max(mx[i], st[j, i])
                for i in T.vectorized(BM):
                    mu[i] = T.if_then_else(mx[i] == T.float32(NEG_INF), T.float32(0), mx[i])
                    al[i] = _exp2_vec(m_i[i] - mu[i])
                    m_i[i] = mx[i]
                    l_i[i] = l_i[i] * al[i]
                for j in T.serial(BN):
                    for i in T.vectorized(BM):
                        st[j, i] = _exp2_vec(st[j, i] - mu[i])
                        l_i[i] = l_i[i] + st[j, i]
                for io in T.serial(BM // RBO):
                    for ii in T.unroll(RBO):
                        for d in T.vectorized(D):
                            acc[io * RBO + ii, d] = acc[io * RBO + ii, d] * al[io * RBO + ii]
                    for j in T.serial(BN):
                        for ii in T.unroll(RBO):
                            for d in T.vectorized(D):
                                acc[io * RBO + ii, d] = acc[io * RBO + ii, d] + st[j, io * RBO + ii] * vs[j, d]
            for i in T.serial(BM):
                if m0 + i < Sq:
                    for d in T.vectorized(D):
                        o[b, hq, m0 + i, d] = T.cast(acc[i, d] / l_i[i], dtype)
                    lse[b, hq, m0 + i] = (m_i[i] + T.log2(l_i[i])) * T.float32(LN2)

    return flash_fwd


def _kv_rows_macro(head_dim: int, block_n: int):
    """A macro ``load_kv_rows(ks, vs, k, v, b, hk, n0, Sk)``: key/value rows n0.. of one tile as
    fp32 rows (zero past Sk), for the kernels that read them as loaded (the forward, dQ)."""

    @T.macro
    def load_kv_rows(ks, vs, k, v, b, hk, n0, Sk):
        for j in T.serial(block_n):
            for d in T.vectorized(head_dim):
                ks[j, d] = T.if_then_else(n0 + j < Sk, T.cast(k[b, hk, T.min(n0 + j, Sk - 1), d], "float32"), T.float32(0))
                vs[j, d] = T.if_then_else(n0 + j < Sk, T.cast(v[b, hk, T.min(n0 + j, Sk - 1), d], "float32"), T.float32(0))

    return load_kv_rows


def _exp2_vec(x):
    """2^x as vector code: x = n + f, n = round(x), f in [-0.5, 0.5], Taylor degree 7 (relative
    error ~1e-8), times 2^n built in the exponent bits; 0 below -126; NaN stays NaN."""
    xc = T.max(x, T.float32(-126.0))
    n = T.round(xc)
    f = xc - n
    p = T.float32(_EXP2_TAYLOR[7])
    for c in reversed(_EXP2_TAYLOR[:7]):
        p = p * f + T.float32(c)
    two_n = T.reinterpret("float32", T.shift_left(T.cast(n, "int32") + 127, 23))
    # NaN stays NaN (it must reach its row's output, as in torch); below -126 (incl. -inf) is 0
    return T.if_then_else(T.isnan(x), x, T.if_then_else(x < T.float32(-126.0), T.float32(0), p * two_n))


def backward_vectorized(head_dim: int, dtype: str, causal: bool, *, block_m: int = 64, block_n: int = 64) -> dict:
    """The CPU backward as vector code, the math of ``compute_backward`` (P from the saved LSE,
    delta = rowsum(dO * O) - dLSE, dS = P * (dP - delta)): ``flash_bwd_dkdv`` (one parallel task
    per (batch, kv head, key tile): dK, dV over the group's query heads and query tiles) and
    ``flash_bwd_dq`` (one per (batch, query head, query tile)).  dK/dV: the task's K and V tiles
    are stored transposed once, so S = Q Kᵀ and dP = dO Vᵀ are vector FMAs across keys; dQ: the
    task's Q and dO tiles are stored transposed once and the key tiles stream in as loaded, so
    Sᵀ = K Qᵀ and dPᵀ = V dOᵀ are vector FMAs across queries (no per-tile transpose); dV += Pᵀ
    dO, dK += dSᵀ Q and dQ += dS K are vector FMAs across D, register-blocked over rows."""
    check_vectorized(head_dim, dtype, block_m, block_n)
    D, BM, BN, RB = head_dim, block_m, block_n, _RB
    RBO = 4 if D <= 64 else 2 if D <= 128 else 1
    load_kv_rows = _kv_rows_macro(D, BN)

    @T.macro
    def load_rows(qs, qs2, dos, dl, ls, q, do, o, lse, dlse, b, hq, row0, Sq, sl2):
        # Q and dO rows (fp32, zero past Sq), Q * scale*log2(e) (S is then the forward's, operation
        # for operation: P of a single key is 1 up to the LSE's rounding), delta = rowsum(dO * O)
        # - dLSE and LSE * log2(e) per row
        for i in T.serial(BM):
            for d in T.vectorized(D):
                qs[i, d] = T.if_then_else(row0 + i < Sq, T.cast(q[b, hq, T.min(row0 + i, Sq - 1), d], "float32"), T.float32(0))
                qs2[i, d] = qs[i, d] * sl2
                dos[i, d] = T.if_then_else(row0 + i < Sq, T.cast(do[b, hq, T.min(row0 + i, Sq - 1), d], "float32"), T.float32(0))
            # one chain over D in the order dP = dO Vᵀ is summed: with a single key O = V and
            # dP - delta cancels exactly (dK = 0), 8-lane partial sums left ~1e-5 of noise in dK
            dl[i] = T.float32(0)
            for d in T.serial(D):
                dl[i] = dl[i] + dos[i, d] * T.cast(o[b, hq, T.min(row0 + i, Sq - 1), d], "float32")
            dl[i] = T.if_then_else(row0 + i < Sq, dl[i] - dlse[b, hq, T.min(row0 + i, Sq - 1)], T.float32(0))
            ls[i] = T.if_then_else(row0 + i < Sq, lse[b, hq, T.min(row0 + i, Sq - 1)] * T.float32(LOG2E), T.float32(0))

    @T.macro
    def load_keys(kt, vt, k, v, b, hk, col0, Sk):
        # dK/dV kernel: the task's K and V tiles, transposed (keys contiguous)
        for j in T.serial(BN):
            for d in T.serial(D):
                kt[d, j] = T.if_then_else(col0 + j < Sk, T.cast(k[b, hk, T.min(col0 + j, Sk - 1), d], "float32"), T.float32(0))
                vt[d, j] = T.if_then_else(col0 + j < Sk, T.cast(v[b, hk, T.min(col0 + j, Sk - 1), d], "float32"), T.float32(0))

    @T.macro
    def rb_matmul(acc, a, bt, r0, n):
        # acc[r0:r0+RB, :n] = a[r0:r0+RB, :D] bt[:D, :n]: RB rows register-blocked, vector FMAs
        # across the n columns
        for rr in T.unroll(RB):
            for c in T.vectorized(n):
                acc[r0 + rr, c] = T.float32(0)
        for d in T.serial(D):
            for rr in T.unroll(RB):
                for c in T.vectorized(n):
                    acc[r0 + rr, c] = acc[r0 + rr, c] + a[r0 + rr, d] * bt[d, c]

    @T.macro
    def half_tile_sum(part, total, m, rows, jo, ih):
        # total[jo*RBO:+RBO, :] += m[i, jo*RBO:+RBO]ᵀ rows[i, :] over query rows i of half ih of
        # the tile, summed in part first (RBO key rows register-blocked, vector FMAs across D)
        for jj in T.unroll(RBO):
            for d in T.vectorized(D):
                part[jj, d] = T.float32(0)
        for i in T.serial(BM // 2):
            for jj in T.unroll(RBO):
                for d in T.vectorized(D):
                    part[jj, d] = part[jj, d] + m[ih * (BM // 2) + i, jo * RBO + jj] * rows[ih * (BM // 2) + i, d]
        for jj in T.unroll(RBO):
            for d in T.vectorized(D):
                total[jo * RBO + jj, d] = total[jo * RBO + jj, d] + part[jj, d]

    @T.macro
    def p_ds(qs2, dos, kt, vt, dl, ls, p, ds, row0, col0, Sq, Sk):
        # S = Q Kᵀ into p, dP = dO Vᵀ into ds (vector FMAs across keys, RB rows per block), then
        # P = exp(scale S - LSE) and dS = P (dP - delta), masked entries 0
        for io in T.serial(BM // RB):
            # S, then dP: one product's RB x BN accumulators at a time stay in vector registers
            # (both at once spilled to the stack, whose random sub-page offset then made the
            # kernel's time bimodal across processes: 4K aliasing with the tiles' loads)
            rb_matmul(p, qs2, kt, io * RB, BN)
            rb_matmul(ds, dos, vt, io * RB, BN)
        for i in T.serial(BM):
            for j in T.vectorized(BN):
                p[i, j] = T.if_then_else((row0 + i >= Sq) or (col0 + j >= Sk) or (causal and col0 + j > row0 + i),
                                         T.float32(0), _exp2_vec(p[i, j] - ls[i]))
                ds[i, j] = p[i, j] * (ds[i, j] - dl[i])

    @T.macro
    def p_ds_t(qt, dot, ks, vs, dl, ls, pt, dst, row0, col0, Sq, Sk):
        # dQ kernel: Sᵀ = K Qᵀ into pt, dPᵀ = V dOᵀ into dst (vector FMAs across queries, RB keys
        # per block: K and V rows as loaded, Q and dO transposed once per task), then
        # Pᵀ = exp(scale Sᵀ - LSE) and dSᵀ = Pᵀ (dPᵀ - delta), masked entries 0
        for jo in T.serial(BN // RB):
            rb_matmul(pt, ks, qt, jo * RB, BM)
            rb_matmul(dst, vs, dot, jo * RB, BM)
        for j in T.serial(BN):
            for i in T.vectorized(BM):
                pt[j, i] = T.if_then_else((row0 + i >= Sq) or (col0 + j >= Sk) or (causal and col0 + j > row0 + i),
                                          T.float32(0), _exp2_vec(pt[j, i] - ls[i]))
                dst[j, i] = pt[j, i] * (dst[j, i] - dl[i])

    # fmt: off
    @T.prim_func
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
        for task in T.parallel(B * Hkv * ((Sk + BN - 1) // BN)):
            qs = T.alloc_buffer((BM, D), "float32")
            qs2 = T.alloc_buffer((BM, D), "float32")
            dos = T.alloc_buffer((BM, D), "float32")
            kt = T.alloc_buffer((D, BN), "float32")
            vt = T.alloc_buffer((D, BN), "float32")
            p = T.alloc_buffer((BM, BN), "float32")
            ds = T.alloc_buffer((BM, BN), "float32")
            dl = T.alloc_buffer((BM,), "float32")
            ls = T.alloc_buffer((BM,), "float32")
            dka = T.alloc_buffer((BN, D), "float32")
            dva = T.alloc_buffer((BN, D), "float32")
            dkp = T.alloc_buffer((RBO, D), "float32")
            dvp = T.alloc_buffer((RBO, D), "float32")
            nkt = (Sk + BN - 1) // BN
            n0 = task % nkt * BN
            hk = task // nkt % Hkv
            b = task // nkt // Hkv
            mt0 = T.if_then_else(causal, T.min(n0 // BM, (Sq + BM - 1) // BM), 0)
            load_keys(kt, vt, k, v, b, hk, n0, Sk)
            for j in T.serial(BN):
                for d in T.vectorized(D):
                    dka[j, d] = T.float32(0)
                    dva[j, d] = T.float32(0)
            for g in T.serial(Hq // Hkv):
                for mi in T.serial((Sq + BM - 1) // BM - mt0):
                    load_rows(qs, qs2, dos, dl, ls, q, do, o, lse, dlse, b, hk * (Hq // Hkv) + g, (mt0 + mi) * BM, Sq,
                              scale * T.float32(LOG2E))
                    p_ds(qs2, dos, kt, vt, dl, ls, p, ds, (mt0 + mi) * BM, n0, Sq, Sk)
                    # partial sums per half query tile, then into the running total: short
                    # fp32 rounding chains over long sequences and large GQA groups (one chain
                    # of 64 rows gave dV 1.08e-5 against float64 at |dV| = 34: 148 rows of a
                    # single key; torch 0.87e-5)
                    # (dV, then dK: one product's RBO x D accumulators at a time stay in registers)
                    for jo in T.serial(BN // RBO):
                        for ih in T.serial(2):
                            half_tile_sum(dvp, dva, p, dos, jo, ih)
                            half_tile_sum(dkp, dka, ds, qs, jo, ih)
            for j in T.serial(BN):
                if n0 + j < Sk:
                    for d in T.vectorized(D):
                        dk[b, hk, n0 + j, d] = T.cast(dka[j, d] * scale, dtype)
                        dv[b, hk, n0 + j, d] = T.cast(dva[j, d], dtype)

    @T.prim_func
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
        for task in T.parallel(B * Hq * ((Sq + BM - 1) // BM)):
            qs = T.alloc_buffer((BM, D), "float32")
            qs2 = T.alloc_buffer((BM, D), "float32")
            dos = T.alloc_buffer((BM, D), "float32")
            qt = T.alloc_buffer((D, BM), "float32")
            dot = T.alloc_buffer((D, BM), "float32")
            ks = T.alloc_buffer((BN, D), "float32")
            vs = T.alloc_buffer((BN, D), "float32")
            pt = T.alloc_buffer((BN, BM), "float32")
            dst = T.alloc_buffer((BN, BM), "float32")
            dl = T.alloc_buffer((BM,), "float32")
            ls = T.alloc_buffer((BM,), "float32")
            dqa = T.alloc_buffer((BM, D), "float32")
            dqp = T.alloc_buffer((RBO, D), "float32")
            nmt = (Sq + BM - 1) // BM
            m0 = task % nmt * BM
            hq = task // nmt % Hq
            b = task // nmt // Hq
            hk = hq // (Hq // Hkv)
            load_rows(qs, qs2, dos, dl, ls, q, do, o, lse, dlse, b, hq, m0, Sq, scale * T.float32(LOG2E))
            for i in T.serial(BM):
                for d in T.serial(D):
                    qt[d, i] = qs2[i, d]
                    dot[d, i] = dos[i, d]
                for d in T.vectorized(D):
                    dqa[i, d] = T.float32(0)
            kv_len = T.if_then_else(causal, T.min(T.min(m0 + BM, Sq), Sk), Sk)
            for jt in T.serial((kv_len + BN - 1) // BN):
                load_kv_rows(ks, vs, k, v, b, hk, jt * BN, Sk)
                p_ds_t(qt, dot, ks, vs, dl, ls, pt, dst, m0, jt * BN, Sq, Sk)
                for io in T.serial(BM // RBO):  # per key tile partial sums, as dK / dV
                    for ii in T.unroll(RBO):
                        for d in T.vectorized(D):
                            dqp[ii, d] = T.float32(0)
                    for j in T.serial(BN):
                        for ii in T.unroll(RBO):
                            for d in T.vectorized(D):
                                dqp[ii, d] = dqp[ii, d] + dst[j, io * RBO + ii] * ks[j, d]
                    for ii in T.unroll(RBO):
                        for d in T.vectorized(D):
                            dqa[io * RBO + ii, d] = dqa[io * RBO + ii, d] + dqp[ii, d]
            for i in T.serial(BM):
                if m0 + i < Sq:
                    for d in T.vectorized(D):
                        dq[b, hq, m0 + i, d] = T.cast(dqa[i, d] * scale, dtype)
    # fmt: on
    return {"flash_bwd_dkdv": flash_bwd_dkdv, "flash_bwd_dq": flash_bwd_dq}
