"""Hopper (sm_90a) FlashAttention forward kernel on ``wgmma``, as TVM TIR (``T.ptx`` dialect).

The FA2 kernel (``cuda_tc``) issues warp-level ``mma.sync``; Hopper's tensor cores reach their
rate only through the warpgroup-level asynchronous ``wgmma.mma_async`` (FA3 and cuDNN use it).
This kernel is ``cuda_tc``'s algorithm moved onto ``wgmma``:

* one CTA per (query tile of ``64 * num_wg`` rows, q-head, batch); ``num_wg`` warpgroups of 128
  threads, each owning 64 query rows (one m64 wgmma tile);
* shared memory in the 128-byte-swizzled K-major layout the tensor cores read without bank
  conflicts: every tile (Q, K, V) is stored as panels of 64 columns (128 bytes per row), row r's
  16-byte chunk c at ``r * 128 + ((c ^ (r % 8)) * 16)`` bytes within its panel; panels are
  1024-byte aligned.  Tiles are loaded with 16-byte ``cp.async`` (zero-filled past Sq/Sk), a warp
  writing 4 whole rows (512 contiguous bytes: conflict-free);
* S = Q K^T: ``head_dim / 16`` wgmma ``m64n{block_n}k16`` with both operands from shared memory
  (matrix descriptors; K-major, SBO = 1024 bytes between 8-row groups; a k16 step inside a panel
  advances the start address by 32 bytes);
* online softmax on the fp32 accumulators in registers (per warp the accumulator has the
  ``mma.sync`` m16n8 layout: row max/sum over the four lanes of a quad, ``ex2.approx``);
* P is packed to fp16/bf16 pairs in registers, which is exactly the register-A fragment layout of
  wgmma; O += P V with ``block_n / 16`` wgmma ``m64n{head_dim}k16`` (A from registers, V from
  shared memory read "transposed", i.e. MN-major: LBO = bytes between 64-column panels, SBO =
  1024 bytes between 8-key groups);
* K/V stream through a ``num_stages`` ring of ``cp.async`` groups; the tile j-1 slot is refilled
  once every warpgroup has waited for its wgmmas that read it;
* epilogue as ``cuda_tc``: O / l to global (rows >= Sq not written), LSE = m * scale + ln(l).

Shapes, GQA, causal (top-left aligned, tiles above the diagonal skipped), tails: as ``cuda_tc``.
Needs the target arch ``sm_90a`` (wgmma does not exist in plain ``sm_90`` PTX).

Entry points as every schedule module: ``supports``, ``default_knobs``, ``schedule``.
"""

from __future__ import annotations

import inspect
import math

import tvm
from tvm.script import tirx as T
from tvm.script.parser.core.utils import inspect_function_capture

__all__ = ["supports", "default_knobs", "schedule", "forward_wgmma", "smem_bytes"]

MAX_SMEM = 232448
_PTX_TYPE = {"float16": "f16", "bfloat16": "bf16"}
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
# An empty volatile asm that reads and writes one register (by reference), issued after
# wgmma.wait_group: later reads of the register depend on it, so the C++ compiler cannot hoist
# them above the wait (it does not see wgmma's asynchronous register writes).
_PIN_SRC = """
__forceinline__ __device__ void tvm_flash_pin(float& r) { asm volatile("" : "+f"(r) :: "memory"); }
"""


def _body_macro(fn):
    """``T.macro(hygienic=False)`` (the body sees the kernel's local names at the use site)
    that also sees its own closure: TVM's non-hygienic macros drop it, so the captured names
    are bound as keyword-only parameters with defaults (TVM binds a macro's defaults)."""
    sig = inspect.signature(fn)
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=value)
             for name, value in inspect_function_capture(fn).items() if name not in sig.parameters]
    fn.__signature__ = sig.replace(parameters=[*sig.parameters.values(), *extra])
    return T.macro(hygienic=False)(fn)


def smem_bytes(head_dim, num_wg=2, block_n=128, num_stages=2):
    """Dynamic shared memory of one CTA: Q tile + num_stages K and V tiles (+1 KiB alignment slack)."""
    return 2 * head_dim * (64 * num_wg + 2 * num_stages * block_n) + 1024


def _check(head_dim, dtype, num_wg, block_n, num_stages, overlap=False):
    if dtype not in _PTX_TYPE:
        raise ValueError(f"dtype must be float16 or bfloat16, got {dtype!r}")
    if head_dim % 64 != 0 or not 64 <= head_dim <= 256:
        raise ValueError(f"head_dim must be 64, 128, 192 or 256 for the wgmma kernel, got {head_dim}")
    if num_wg not in (1, 2, 3):
        raise ValueError(f"num_wg must be 1, 2 or 3, got {num_wg}")
    if block_n % 16 != 0 or not 16 <= block_n <= 256:
        raise ValueError(f"block_n must be a multiple of 16 in [16, 256], got {block_n}")
    if num_stages < 2:
        raise ValueError("num_stages must be >= 2")
    # S + O accumulators + packed P per thread, plus ~30 others, must fit the per-thread register
    # budget of 128*num_wg threads (nvcc: 255 at 1-2 warpgroups, 168 at 3), else ptxas spills and
    # serializes the wgmmas (measured: hd128 num_wg=3 block_n=176 spilled 1.4 KB; hd128 3x96: 166)
    acc = block_n // 2 * (2 if overlap else 1) + head_dim // 2 + block_n // 4
    budget = min(255, 65536 // (128 * num_wg))
    if acc > 190 or acc + 30 > budget:
        raise ValueError(f"head_dim={head_dim}, block_n={block_n}, num_wg={num_wg}: {acc} accumulator registers "
                         f"per thread do not fit the register budget ({budget}); use a smaller block_n or num_wg")
    if smem_bytes(head_dim, num_wg, block_n, num_stages) > MAX_SMEM:
        raise ValueError("tile configuration exceeds 227 KiB of shared memory")


def forward_wgmma(
    head_dim: int,
    dtype: str,
    causal: bool,
    *,
    num_wg: int = 2,
    block_n: int = 128,
    num_stages: int = 2,
    defer_pv_wait: bool | None = None,
    overlap: bool = False,
) -> tvm.tirx.PrimFunc:
    """Build the wgmma forward PrimFunc ``flash_fwd`` (see the module docstring).

    ``defer_pv_wait``: leave tile j's P V wgmmas in flight until the wait for tile j+1's
    Q K^T (they overlap the barrier and the next issue); else wait at the end of the iteration.
    Default: deferred when not causal (with the causal masking ptxas serializes the deferred
    wgmmas: warning C7515).

    ``overlap`` (opt-in, compile-checked, NOT yet run on a GPU, not in ``KNOB_SPACE``): FA3's
    intra-warpgroup pipelining: the Q K^T wgmmas of tile j+1 are issued before the softmax of
    tile j (two S register sets, loop unrolled by two); needs ``num_stages >= 3`` (tile j+1
    must have landed one step early); ``defer_pv_wait`` is moot.  ptxas reports C7515
    (serialized wgmmas) for it so far.
    """
    if defer_pv_wait is None:
        defer_pv_wait = not causal
    if overlap and num_stages < 3:
        raise ValueError("overlap needs num_stages >= 3")
    _check(head_dim, dtype, num_wg, block_n, num_stages, overlap)
    D, BN, NS, NWG = head_dim, block_n, num_stages, num_wg
    BM = 64 * NWG
    NT = 128 * NWG
    NP = D // 64  # 64-column panels per row
    KD = D // 16  # k16 steps of Q K^T
    KN = BN // 16  # k16 steps of P V
    SACC = BN // 2  # S accumulators per thread
    OACC = D // 2  # O accumulators per thread
    Q_PANEL = BM * 64  # elements of one Q panel
    KV_PANEL = BN * 64
    K_OFF = NP * Q_PANEL  # element offsets in the shared buffer (all multiples of 512 = 1 KiB)
    V_OFF = K_OFF + NS * NP * KV_PANEL
    SMEM = V_OFF + NS * NP * KV_PANEL
    Q_IT = BM * (D // 8) // NT  # 16-byte copies per thread
    assert BM * (D // 8) % NT == 0
    KV_REM = BN * (D // 8) % NT  # block_n * D/8 need not divide by the thread count
    KV_IT_ALL = (BN * (D // 8) + NT - 1) // NT
    # descriptor fields are in 16-byte units
    K_SBO = 1024 >> 4
    V_LBO, V_SBO = (KV_PANEL * 2) >> 4, 1024 >> 4  # checked on the GPU: the swapped order is wrong

    ab = _PTX_TYPE[dtype]
    wg_ss = T.ptx[f"wgmma.mma_async.sync.aligned.m64n{BN}k16.f32.{ab}.{ab}"]
    wg_rs = T.ptx[f"wgmma.mma_async.sync.aligned.m64n{D}k16.f32.{ab}.{ab}"]
    wg_fence = T.ptx["wgmma.fence.sync.aligned"]
    wg_commit = T.ptx["wgmma.commit_group.sync.aligned"]
    wg_wait = T.ptx["wgmma.wait_group.sync.aligned"]
    fence_proxy = T.ptx["fence.proxy.async.shared::cta"]
    cp_async = T.ptx["cp.async.cg.shared.global"]
    commit = T.ptx["cp.async.commit_group"]
    wait_group = T.ptx["cp.async.wait_group"]
    ex2 = T.ptx["ex2.approx.ftz.f32"]
    pack2 = T.ptx[f"cvt.rn.{ab}x2.f32"]
    LOG2E, LN2 = _LOG2E, _LN2
    NEG_INF = -math.inf
    FULL = 0xFFFFFFFF

    @T.macro
    def load_kv(smem, k, v, bz, hk, Sk, tile, slot, tx):
        for it in T.unroll(KV_IT_ALL):
            e = it * NT + tx
            if KV_REM == 0 or e < BN * (D // 8):
                # e -> (panel, row, chunk-in-panel): a warp covers 4 rows x 8 chunks of one panel
                c8 = (e // (8 * BN)) * 8 + e % 8
                r = (e // 8) % BN
                kr = tile * BN + r
                so = slot * NP * KV_PANEL + (c8 // 8) * KV_PANEL + r * 64 + ((c8 % 8) ^ (r % 8)) * 8
                ok = T.if_then_else(kr < Sk, T.uint32(16), T.uint32(0))
                cp_async(T.address_of(smem[K_OFF + so]), T.address_of(k[bz, hk, T.min(kr, Sk - 1), c8 * 8]), 16, ok)
                cp_async(T.address_of(smem[V_OFF + so]), T.address_of(v[bz, hk, T.min(kr, Sk - 1), c8 * 8]), 16, ok)

    # The loop body's pieces (hygienic=False: they use the kernel's local names).
    @_body_macro
    def pin_all(buf, n):
        # pin registers after wgmma.wait_group (the C++ compiler must not move their reads
        # above it: it cannot see the asynchronous writes)
        for i in T.unroll(n):
            T.cuda.func_call("tvm_flash_pin", buf[i], source_code=_PIN_SRC)

    @_body_macro
    def issue_s(sb, slot):
        # S = Q K^T of the tile in ring slot `slot`, both from shared memory; committed, not waited
        wg_fence()
        for kd in T.unroll(KD):
            wg_ss(*[sb[i] for i in range(SACC)],
                  desc[0] + T.uint64(((kd // 4) * Q_PANEL * 2 + (kd % 4) * 32) >> 4),
                  desc[1] + T.uint64(((slot * NP + kd // 4) * KV_PANEL * 2 + (kd % 4) * 32) >> 4),
                  kd > 0, 1, 1, 0, 0)
        wg_commit()

    @_body_macro
    def softmax_pv(sb, jt, slot):
        # masking (key-tail / diagonal tiles only), online softmax, O *= alpha, then
        # O += P V with P from registers and V (MN-major) from shared memory; committed, not waited
        n0 = jt * BN
        if (n0 + BN > Sk) or (causal and n0 + BN - 1 > m0 + wg * 64):
            for nt, hh, e2 in T.grid(BN // 8, 2, 2):
                row = m0 + wg * 64 + warp * 16 + g + hh * 8
                col = n0 + nt * 8 + t4 * 2 + e2
                if (col >= Sk) or (causal and col > row):
                    sb[nt * 4 + hh * 2 + e2] = T.float32(NEG_INF)
        for hh in T.unroll(2):
            red[0] = m_i[hh]
            for nt, e2 in T.grid(BN // 8, 2):
                red[0] = T.max(red[0], sb[nt * 4 + hh * 2 + e2])
            red[0] = T.max(red[0], T.tvm_warp_shuffle_xor(T.uint32(FULL), red[0], 1, 32, 32))
            red[0] = T.max(red[0], T.tvm_warp_shuffle_xor(T.uint32(FULL), red[0], 2, 32, 32))
            mu[0] = T.if_then_else(red[0] == T.float32(NEG_INF), T.float32(0), red[0])
            ex2(alpha[0], (m_i[hh] - mu[0]) * sl2)
            m_i[hh] = red[0]
            red[0] = mu[0] * sl2
            for nt, e2 in T.grid(BN // 8, 2):
                ex2(sb[nt * 4 + hh * 2 + e2], sb[nt * 4 + hh * 2 + e2] * sl2 - red[0])
            l_i[hh] = l_i[hh] * alpha[0]
            for nt, e2 in T.grid(BN // 8, 2):
                l_i[hh] = l_i[hh] + sb[nt * 4 + hh * 2 + e2]
            for dt, e2 in T.grid(D // 8, 2):
                acc[dt * 4 + hh * 2 + e2] = acc[dt * 4 + hh * 2 + e2] * alpha[0]
        for kn in T.unroll(KN):
            pack2(pf[kn * 4 + 0], sb[(2 * kn) * 4 + 1], sb[(2 * kn) * 4 + 0])
            pack2(pf[kn * 4 + 1], sb[(2 * kn) * 4 + 3], sb[(2 * kn) * 4 + 2])
            pack2(pf[kn * 4 + 2], sb[(2 * kn + 1) * 4 + 1], sb[(2 * kn + 1) * 4 + 0])
            pack2(pf[kn * 4 + 3], sb[(2 * kn + 1) * 4 + 3], sb[(2 * kn + 1) * 4 + 2])
        wg_fence()
        for kn in T.unroll(KN):
            wg_rs(*[acc[i] for i in range(OACC)],
                  pf[kn * 4 + 0], pf[kn * 4 + 1], pf[kn * 4 + 2], pf[kn * 4 + 3],
                  desc[2] + T.uint64((slot * NP * KV_PANEL * 2 + kn * 16 * 128) >> 4),
                  True, 1, 1, 1)
        wg_commit()

    @_body_macro
    def refill_softmax_pv(sb, jt, slot):
        # after the wait that completed S_jt and P V_{jt-1}: pin their registers; once every
        # warpgroup is past that wait, tile jt-1's ring slot is free: refill it; then softmax + P V
        pin_all(sb, SACC)
        pin_all(acc, OACC)
        T.tvm_storage_sync("shared")
        if jt + NS - 1 < n_blk:
            load_kv(smem, k, v, bz, hk, Sk, jt + NS - 1, (jt + NS - 1) % NS, tx)
        commit()
        softmax_pv(sb, jt, slot)

    @_body_macro
    def overlap_step(jt, s_cur, s_next):
        # S_jt is in flight (issued by the previous step); tile jt+1 must be in shared memory
        # to issue S_{jt+1} now.  Ring: tile jt+1 was loaded two steps ago (num_stages >= 3).
        if jt + 1 < n_blk:
            wait_group(NS - 3)  # tile jt+1 landed (own copies)
            fence_proxy()
            T.tvm_storage_sync("shared")
            issue_s(s_next, (jt + 1) % NS)
            wg_wait(1)  # all but S_{jt+1}: S_jt and P V_{jt-1} are complete
        else:
            wg_wait(0)
        refill_softmax_pv(s_cur, jt, jt % NS)

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
        o32 = T.decl_buffer((B * Hq * Sq * (D // 2),), "uint32", data=o.data)
        for bx in T.thread_binding((Sq + BM - 1) // BM, thread="blockIdx.x"):
            for hq in T.thread_binding(Hq, thread="blockIdx.y"):
                for bz in T.thread_binding(B, thread="blockIdx.z"):
                    smem = T.alloc_buffer((SMEM,), dtype, scope="shared.dyn", align=1024)
                    for tx in T.thread_binding(NT, thread="threadIdx.x"):
                        s = T.alloc_buffer((SACC,), "float32", scope="local")
                        s2 = T.alloc_buffer((SACC if overlap else 1,), "float32", scope="local")
                        acc = T.alloc_buffer((OACC,), "float32", scope="local")
                        pf = T.alloc_buffer((KN * 4,), "uint32", scope="local")
                        desc = T.alloc_buffer((3,), "uint64", scope="local")
                        m_i = T.alloc_buffer((2,), "float32", scope="local")
                        l_i = T.alloc_buffer((2,), "float32", scope="local")
                        red = T.alloc_buffer((1,), "float32", scope="local")
                        alpha = T.alloc_buffer((1,), "float32", scope="local")
                        mu = T.alloc_buffer((1,), "float32", scope="local")
                        pk = T.alloc_buffer((1,), "uint32", scope="local")
                        m_blk = T.if_then_else(causal, (Sq + BM - 1) // BM - 1 - bx, bx)
                        m0 = m_blk * BM
                        hk = hq // (Hq // Hkv)
                        wg = tx // 128
                        warp = (tx % 128) // 32
                        lane = tx % 32
                        g = lane // 4
                        t4 = lane % 4
                        sl2 = scale * T.float32(LOG2E)
                        kv_len = T.if_then_else(causal, T.min(T.min(m0 + BM, Sq), Sk), Sk)
                        n_blk = (kv_len + BN - 1) // BN

                        # ---- Q tile -> shared (zero-filled past Sq), first NS-1 K/V tiles ----
                        for it in T.unroll(Q_IT):
                            e = it * NT + tx
                            c8 = (e // (8 * BM)) * 8 + e % 8
                            r = (e // 8) % BM
                            cp_async(T.address_of(smem[(c8 // 8) * Q_PANEL + r * 64 + ((c8 % 8) ^ (r % 8)) * 8]),
                                     T.address_of(q[bz, hq, T.min(m0 + r, Sq - 1), c8 * 8]), 16,
                                     T.if_then_else(m0 + r < Sq, T.uint32(16), T.uint32(0)))
                        for st in T.unroll(NS - 1):
                            if st < n_blk:
                                load_kv(smem, k, v, bz, hk, Sk, st, st, tx)
                            commit()

                        for i in T.serial(OACC):
                            acc[i] = T.float32(0)
                        for hh in T.serial(2):
                            m_i[hh] = T.float32(NEG_INF)
                            l_i[hh] = T.float32(0)
                        # base descriptors: Q (this warpgroup's 64 rows), K slot 0, V slot 0
                        T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc[0]), T.address_of(smem[wg * 64 * 64]), 1, K_SBO, 3)
                        T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc[1]), T.address_of(smem[K_OFF]), 1, K_SBO, 3)
                        T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc[2]), T.address_of(smem[V_OFF]), V_LBO, V_SBO, 3)

                        if not overlap:
                            for j in T.serial(n_blk):
                                wait_group(NS - 2)  # tile j (and Q) landed: own copies
                                fence_proxy()  # ... visible to the tensor cores' async proxy
                                T.tvm_storage_sync("shared")  # ... and everyone's copies
                                slot = j % NS
                                issue_s(s, slot)
                                wg_wait(0)  # S_j and the previous P V are complete
                                refill_softmax_pv(s, j, slot)
                                if not defer_pv_wait:
                                    wg_wait(0)
                                    pin_all(acc, OACC)
                        else:
                            # S_{j+1} runs on the tensor cores while the softmax of tile j runs on
                            # the CUDA cores (two S register sets, loop unrolled by two)
                            wait_group(NS - 2)
                            fence_proxy()
                            T.tvm_storage_sync("shared")
                            issue_s(s, 0)
                            for jj in T.serial((n_blk + 1) // 2):
                                overlap_step(2 * jj, s, s2)
                                if 2 * jj + 1 < n_blk:
                                    overlap_step(2 * jj + 1, s2, s)

                        wg_wait(0)
                        for i in T.unroll(OACC):
                            T.cuda.func_call("tvm_flash_pin", acc[i], source_code=_PIN_SRC)
                        # ---- epilogue: O / l and LSE ----
                        for hh in T.unroll(2):
                            red[0] = l_i[hh]
                            red[0] = red[0] + T.tvm_warp_shuffle_xor(T.uint32(FULL), red[0], 1, 32, 32)
                            red[0] = red[0] + T.tvm_warp_shuffle_xor(T.uint32(FULL), red[0], 2, 32, 32)
                            row = m0 + wg * 64 + warp * 16 + g + hh * 8
                            if row < Sq:
                                alpha[0] = T.if_then_else(red[0] > T.float32(0), T.float32(1) / red[0], T.float32(0))
                                for dt in T.unroll(D // 8):
                                    pack2(pk[0], acc[dt * 4 + hh * 2 + 1] * alpha[0], acc[dt * 4 + hh * 2] * alpha[0])
                                    o32[(((bz * Hq + hq) * Sq + row) * D + dt * 8 + t4 * 2) // 2] = pk[0]
                                if t4 == 0:
                                    lse[bz, hq, row] = (m_i[hh] * sl2 + T.log2(red[0])) * T.float32(LN2)
    # fmt: on
    return flash_fwd


KNOB_SPACE = {
    "num_wg": [1, 2, 3],
    "block_n": [32, 64, 96, 128, 176],
    "num_stages": [2, 3],
    "defer_pv_wait": [0, 1],
}


def supports(head_dim: int, dtype: str) -> bool:
    """fp16/bf16 with a head dim of 64, 128, 192 or 256 (128-byte-swizzled 64-column panels)."""
    return dtype in _PTX_TYPE and head_dim % 64 == 0 and 64 <= head_dim <= 256


def default_knobs(head_dim: int, dtype: str, causal: bool = False) -> dict:
    """The best of a knob sweep on the H200 (bf16, B4 H16 S4096; docs/perf-notes.md, v3):
    hd64 416 / 386 TFLOP/s (non-causal / causal), hd128 460 / 376."""
    base = {"num_wg": 2, "block_n": 64, "num_stages": 2, "defer_pv_wait": int(not causal)}
    if head_dim <= 64:
        return {**base, "block_n": 96, "num_stages": 3} if causal else base
    if head_dim <= 128:
        return {**base, "num_wg": 3, "block_n": 96}
    return base  # hd192/256: 2 x 64 rows, 64-key tiles (no register spill)


def check_knobs(head_dim: int, dtype: str, causal: bool, knobs: dict) -> None:
    k = {**default_knobs(head_dim, dtype, causal), **knobs}
    _check(head_dim, dtype, k["num_wg"], k["block_n"], k["num_stages"], bool(k.get("overlap", False)))
    if k.get("overlap") and k["num_stages"] < 3:
        raise ValueError("overlap needs num_stages >= 3")


def schedule(head_dim: int, dtype: str, causal: bool, **knobs) -> tvm.tirx.PrimFunc:
    knobs = {**default_knobs(head_dim, dtype, causal), **knobs}
    for name in ("defer_pv_wait", "overlap"):
        if knobs.get(name) is not None:
            knobs[name] = bool(knobs[name])
    return forward_wgmma(head_dim, dtype, causal, **knobs)
