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
* K/V stream through a ``num_stages`` ring in shared memory.  Two ways to fill it:
  - all threads load (``ws=0``): ``cp.async`` groups, one ``__syncthreads`` per tile; the slot of
    tile j-1 is refilled once every warpgroup has waited for its wgmmas that read it;
  - warp specialized (``ws=1``, FA3's producer/consumer split): one more warpgroup only loads;
    per ring slot a "full" mbarrier (fires when the tile has landed) and an "empty" one (one
    arrival per consumer warp once its wgmmas no longer read the tile), so consumer warpgroups
    never wait for each other and drift apart (one's softmax runs while another's wgmmas do).
    The loader is one thread issuing TMA copies (``tma=1``, the default there: tensor maps
    encoded on the host, copies completing on the full barrier by bytes) or its 128 threads
    issuing ``cp.async`` (``tma=0``; ``cp.async.mbarrier.arrive.noinc``).  When the consumers need
    more registers than the launch gives, ``setmaxnreg`` moves them from the loader;
  - ``kv_split=1`` (FA3's separate K and V pipelines): K and V of a slot have barriers of their
    own, K is released after S and runs a tile ahead of V, so 2 slots feed two warpgroups;
  - ``persistent=P`` (with TMA): P CTAs walk the query tiles, the loader's ring running on
    across tiles; with ``kv_split``, 2 slots and TMA stores the kernel for hd128 non-causal
    key lengths up to 1024 (``short_knobs``, perf-notes v16), slower elsewhere (v10, v15);
* loop order: plain (S_j, wait, softmax_j, P V_j) or, with ``overlap=1``, FA3's intra-warpgroup
  order (issue S_{j+1}, rescale O, issue P V_j, wait S_{j+1}, softmax_{j+1} while P V_j runs);
  with ``pingpong=1`` (and ``ws``) also FA3's inter-warpgroup order: the consumer warpgroups take
  turns to issue their wgmmas (named barriers, round robin), so one's softmax runs while the
  next one's GEMMs do, instead of drifting into step;
* epilogue: O / l (rows >= Sq not written), LSE = m * scale + ln(l); with ``tma_store`` (the
  default wherever the tiles come by TMA) O goes through shared memory and out by TMA stores.

Shapes, GQA, causal (top-left aligned, tiles above the diagonal skipped), tails: as ``cuda_tc``.
Needs the target arch ``sm_90a`` (wgmma does not exist in plain ``sm_90`` PTX).

Entry points as every schedule module: ``supports``, ``default_knobs``, ``schedule``.
"""

from __future__ import annotations

import math

import tvm
from tvm.script import tirx as T

from tvm_flash.compute import LN2, LOG2E

from .common import MAX_SMEM, PTX_TYPE, asm_call, body_macro, pack_frag_macro, pin_all, tensormap_macro, tma_tile_macro

__all__ = ["supports", "default_knobs", "short_knobs", "schedule", "forward_wgmma", "smem_bytes"]

# mbarriers (warp-specialized variant): init, wait for a phase parity, arrive, arrive once this
# thread's cp.async copies have landed.  name -> (extra C parameter, PTX, asm operands); the
# barrier's shared-memory address is operand %0 ("a").  One helper per name: TVM emits a
# func_call's source once per function name.
_MBAR_ASM = {
    "mbar_init": ("int count", "mbarrier.init.shared::cta.b64 [%0], %1;", '"r"(a), "r"(count)'),
    "mbar_wait": ("int parity", "{\\n .reg .pred p;\\n TVM_FLASH_WAIT:\\n mbarrier.try_wait.parity.shared::cta.b64 p, "
                  "[%0], %1;\\n @!p bra TVM_FLASH_WAIT;\\n}", '"r"(a), "r"(parity)'),
    "mbar_arrive": ("", "mbarrier.arrive.shared::cta.b64 _, [%0];", '"r"(a)'),
    "cp_async_arrive": ("", "cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];", '"r"(a)'),
}


def _setmaxnreg(op, n):
    """setmaxnreg.{inc,dec} to n registers per thread (warpgroup-wide)."""
    name = f"tvm_flash_setmaxnreg_{op}_{n}"
    src = f'__forceinline__ __device__ void {name}() {{ asm volatile("setmaxnreg.{op}.sync.aligned.u32 {n};"); }}\n'
    return T.cuda.func_call(name, source_code=src)


def _named_bar(op, bar_id, count):
    """``bar.sync`` / ``bar.arrive`` on named barrier ``bar_id`` (1-15; 0 is __syncthreads) for
    ``count`` threads: the ping-pong order of the consumer warpgroups, a warpgroup's epilogue,
    the backward's dQ staging."""
    name = f"tvm_flash_bar_{op}"
    src = (f"__forceinline__ __device__ void {name}(int id, int n) {{\n"
           f'  asm volatile("bar.{op} %0, %1;" :: "r"(id), "r"(n) : "memory");\n}}\n')
    return T.cuda.func_call(name, bar_id, count, source_code=src)


def _mbar(op, addr, *args):
    """Call the mbarrier helper ``op`` of ``_MBAR_ASM`` on the barrier at ``addr`` (shared memory)."""
    param, asm, operands = _MBAR_ASM[op]
    src = (f"__forceinline__ __device__ void tvm_flash_{op}(void* bar{', ' + param if param else ''}) {{\n"
           f"  unsigned a = (unsigned)__cvta_generic_to_shared(bar);\n"
           f'  asm volatile("{asm}" :: {operands} : "memory");\n}}\n')
    return T.cuda.func_call(f"tvm_flash_{op}", addr, *args, source_code=src)


def ws_registers(num_wg, tma=False):
    """(launch, loader, consumer) registers per thread of the warp-specialized variant: num_wg
    consumer warpgroups + 1 loader warpgroup.  The launch gives every thread ``launch`` registers
    (the most __launch_bounds__ allows); when the consumers need more, the loader gives registers
    back (setmaxnreg.dec to ``loader``: its cp.async address arithmetic spills below 64) and the
    consumers take them (setmaxnreg.inc to ``consumer``), within the launch's pool."""
    nt = 128 * (num_wg + 1)
    launch = min(255, 65536 // nt) // 8 * 8
    loader = 40 if tma else 64  # a TMA loader is one thread issuing a few instructions per tile
    consumer = min(240, (launch * nt - 128 * loader) // (128 * num_wg) // 8 * 8)
    return launch, loader, consumer


def smem_bytes(head_dim, num_wg=2, block_n=128, num_stages=2, ws=False, persistent=False, o_stage=False,
               kv_split=False):
    """Dynamic shared memory of one CTA: Q tile + num_stages K and V tiles (+1 KiB alignment slack;
    + 2 mbarriers per ring slot when warp specialized, 4 with ``kv_split``, + 2 for the Q tile
    when persistent; + an O tile of its own where the epilogue's TMA stores cannot use Q's:
    persistent)."""
    bars = ((32 if kv_split else 16) * num_stages if ws else 0) + (16 if persistent else 0)
    rows = 64 * num_wg * (2 if o_stage else 1)
    return 2 * head_dim * (rows + 2 * num_stages * block_n) + 1024 + bars


def _acc_regs(head_dim, block_n):
    """S + O accumulators + packed P registers per thread."""
    return block_n // 2 + head_dim // 2 + block_n // 4


def _check(head_dim, dtype, num_wg, block_n, num_stages, overlap=False, ws=False, pingpong=False, tma=False,
           persistent=0, tma_store=False, kv_split=False, tile_order=0):
    if dtype not in PTX_TYPE:
        raise ValueError(f"dtype must be float16 or bfloat16, got {dtype!r}")
    if head_dim % 64 != 0 or not 64 <= head_dim <= 256:
        raise ValueError(f"head_dim must be 64, 128, 192 or 256 for the wgmma kernel, got {head_dim}")
    if num_wg not in (1, 2, 3):
        raise ValueError(f"num_wg must be 1, 2 or 3, got {num_wg}")
    if block_n % 16 != 0 or not 16 <= block_n <= 256:
        raise ValueError(f"block_n must be a multiple of 16 in [16, 256], got {block_n}")
    if num_stages < 2:
        raise ValueError("num_stages must be >= 2")
    if pingpong and not (ws and overlap and num_wg >= 2):
        raise ValueError("pingpong needs ws=1, overlap=1 and num_wg >= 2")
    if persistent and not (tma and ws):
        raise ValueError("persistent needs tma=1 and ws=1 (the loader warpgroup runs ahead across query tiles)")
    if tile_order not in (0, 1) or (tile_order and not persistent):
        raise ValueError(f"tile_order must be 0 or 1 (1 only with persistent), got {tile_order}")
    if persistent < 0:
        raise ValueError(f"persistent must be 0 (off) or the number of CTAs, got {persistent}")
    if tma_store and not tma:
        raise ValueError("tma_store needs tma=1")
    if kv_split and not (ws and tma and overlap):
        raise ValueError("kv_split needs ws=1, tma=1 and overlap=1 (the TMA loader and FA3's loop order)")
    # S + O accumulators + packed P per thread, plus ~30 others, must fit the per-thread register
    # budget of 128*num_wg threads (nvcc: 255 at 1-2 warpgroups, 168 at 3; with ws the consumers'
    # share after setmaxnreg, ws_registers), else ptxas spills and serializes the wgmmas
    # (measured: hd128 num_wg=3 block_n=176 spilled 1.4 KB; hd128 3x96: 166).  At most 190
    # accumulators, or 196 under setmaxnreg (FA3's hd128 tile, 176 keys: assembles clean with
    # 232 consumer registers; the 200 of hd256 x 96 spilled without warp specialization)
    acc = _acc_regs(head_dim, block_n)
    budget = ws_registers(num_wg, tma)[2] if ws else min(255, 65536 // (128 * num_wg))
    if acc > (196 if ws else 190) or acc + 30 > budget:
        raise ValueError(f"head_dim={head_dim}, block_n={block_n}, num_wg={num_wg}: {acc} accumulator registers "
                         f"per thread do not fit the register budget ({budget}); use a smaller block_n or num_wg")
    if smem_bytes(head_dim, num_wg, block_n, num_stages, ws or tma, bool(persistent), bool(tma_store and persistent),
                  kv_split) > MAX_SMEM:
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
    ws: bool = False,
    pingpong: bool = False,
    tma: bool = False,
    persistent: int = 0,
    tma_store: bool = False,
    kv_split: bool = False,
    tile_order: int = 0,
    ablate: str = "",
) -> tvm.tirx.PrimFunc:
    """Build the wgmma forward PrimFunc ``flash_fwd`` (see the module docstring).

    ``defer_pv_wait``: leave tile j's P V wgmmas in flight until the wait for tile j+1's
    Q K^T (they overlap the barrier and the next issue); else wait at the end of the iteration.
    Default: deferred when not causal (with the causal masking ptxas serializes the deferred
    wgmmas: warning C7515).

    ``overlap``: FA3's intra-warpgroup order: S_{j+1} = Q K_{j+1}^T is issued before O is
    rescaled and P_j V_j issued; the softmax of tile j+1 then runs on the CUDA cores while P V_j
    runs on the tensor cores (one S register set: P_{j+1} is packed after P V_j completes, since
    wgmma reads its register operand asynchronously).  ``defer_pv_wait`` is moot.  Without
    ``ws`` it needs ``num_stages >= 3`` (tile j+1 must land a step early).

    ``ws``: warp specialization (module docstring): a loader warpgroup and mbarriers in place of
    all-thread loads and ``__syncthreads``.

    ``pingpong``: with ``ws`` and ``overlap``, the consumer warpgroups issue their wgmmas in
    turn (warpgroup w waits on named barrier 1+w, then arrives on the next one's): FA3's
    warp-scheduler barrier.  Warpgroup 0 goes first; the last warpgroup arrives once before its
    loop and skips its final arrival, so every barrier's arrivals match its waits.

    ``tma`` (with ``ws``; the default there, perf-notes v9): the loader
    is one thread issuing TMA copies (``cp.async.bulk.tensor``, tensor maps encoded on the
    host per call, 128-byte swizzle = this kernel's panel layout, rows past Sq/Sk zero-filled by
    the hardware) that complete on the full barriers by transaction bytes; the loader warpgroup
    keeps 40 registers, the consumers get the rest.  Without ``ws``: thread 0 issues the same
    copies where the all-threads loop issued ``cp.async``, and every thread waits on the slot's
    full mbarrier instead of its own copies + a ``__syncthreads`` (plain order: the hd64
    defaults, perf-notes v11; FA3 order: v13, exact but slower than the defaults, so only
    where ``tma`` is given explicitly — a default ``tma`` is dropped there).

    ``persistent`` (with ``tma``; 0 = off, else the number of CTAs, e.g. the card's SM count):
    a fixed grid of CTAs, each walking the query tiles ``cta, cta + P, ...`` (P = the grid);
    the loader's ring of K/V slots runs on across tiles and the Q tile has its own full/empty
    barriers, so the next tile's Q and first K/V tiles load while the consumers finish the last
    P V and write the epilogue (the per-CTA skeleton that dominates short sequences, perf-notes v7).

    ``tma_store`` (with ``tma``): the epilogue writes each warpgroup's O rows into the shared
    memory its Q rows occupied (free once its last Q K^T is complete; the same 128-byte-swizzled
    panels, conflict-free 4-byte stores), and one thread per warpgroup stores them with TMA
    (rows past Sq clipped by the hardware) in place of 4-byte global stores from every thread
    (perf-notes v14: the stores were 16% of the kernel at hd128 seq 512).  With ``persistent``
    the loader refills Q during the epilogue, so O gets a tile of its own after the ring (more
    shared memory: e.g. hd128 needs block_n 96 or 2 slots), the stores run on into the next
    tile, and the next epilogue waits until they have read it (v15: exact, 2-3% slower than the
    defaults at hd128 non-causal, 27% with causal masking; not a default).

    ``kv_split`` (with ``ws``, ``tma``, ``overlap``; FA3's separate K and V pipelines): each ring
    slot's K and V tiles get full/empty mbarriers of their own.  A warpgroup releases K_j as soon
    as S_j is complete and V_j after P V_j; the loader issues K_{j+1} before V_j.  So K runs a
    tile ahead of V, and a 2-slot ring (160 KB at hd128 with 128-key tiles) can feed two
    ping-ponging warpgroups, which the shared slot could not (v12); the room left holds the
    persistent kernel's O tile beside 128-key tiles, or FA3's 176-key tile.

    ``tile_order`` (with ``persistent``): the order of the tiles the CTAs walk: 0, query tile
    fastest (as the one-CTA-per-tile launch); 1, query tile slowest (each round of the CTAs
    takes one query tile of many heads: balanced work with causal masking, perf-notes v16).

    ``ablate`` (timing experiments only, ``benchmarks/ablate.py``; the results are wrong): leave
    a stage of the loop out: e (exp2), p (P V wgmma), q (Q K^T wgmma); in the all-threads loop
    without ``overlap`` also s (its __syncthreads) and l (its refill loads); o: the epilogue's
    global stores of O and LSE (behind a branch never taken, so the math they consume stays:
    skipped outright, nvcc deleted the whole loop).
    """
    if defer_pv_wait is None:
        defer_pv_wait = not causal
    if overlap and not ws and num_stages < 3:
        raise ValueError("overlap needs num_stages >= 3 (or ws)")
    _check(head_dim, dtype, num_wg, block_n, num_stages, overlap, ws, pingpong, tma, persistent, tma_store, kv_split,
           tile_order)
    PERSIST, KVS = bool(persistent), bool(kv_split)
    D, BN, NS, NWG = head_dim, block_n, num_stages, num_wg
    # timing experiments only (the results are wrong): leave one stage of the loop out
    AB_EXP, AB_SYNC, AB_LOAD, AB_PV, AB_S, AB_OUT = (c in ablate for c in "eslpqo")
    if tma and not ws and (AB_SYNC or AB_LOAD):  # threads would wait on tiles never loaded / lose a phase
        raise ValueError("ablate s / l do not apply to tma without ws")
    if tma_store and AB_OUT:
        raise ValueError("ablate o leaves out the threads' global stores: use tma_store=0")
    BM = 64 * NWG
    NT = 128 * (NWG + int(ws))  # threads: num_wg consumer warpgroups (+ 1 loader when ws)
    LT = 128 if ws else NT  # threads that load K/V (and Q)
    R_LAUNCH, R_LOADER, R_CONSUMER = ws_registers(NWG, tma)
    # move registers to the consumers only when they need more than the launch gives.  Where
    # setmaxnreg survives, ptxas allocates the launch maximum (the pool arithmetic of
    # ws_registers assumes it; the CI checks it); a kernel that fits the launch budget anyway
    # got fewer registers (114 of 128 at 4 warpgroups) and ptxas drops setmaxnreg from it
    REG_SPLIT = ws and _acc_regs(D, BN) + 40 > R_LAUNCH
    assert not REG_SPLIT or R_CONSUMER > R_LAUNCH  # setmaxnreg.inc below the current count is undefined
    NP = D // 64  # 64-column panels per row
    KD = D // 16  # k16 steps of Q K^T
    KN = BN // 16  # k16 steps of P V
    SACC = BN // 2  # S accumulators per thread
    OACC = D // 2  # O accumulators per thread
    Q_PANEL = BM * 64  # elements of one Q panel
    KV_PANEL = BN * 64
    K_OFF = NP * Q_PANEL  # element offsets in the shared buffer (all multiples of 512 = 1 KiB)
    V_OFF = K_OFF + NS * NP * KV_PANEL
    # tma_store: O staged where Q was, or (persistent: the loader refills Q during the epilogue)
    # in an O tile of its own after the ring
    O_STAGE = tma_store and PERSIST
    EPI_OFF = V_OFF + NS * NP * KV_PANEL if O_STAGE else 0
    # ws or tma: mbarriers full[NS] (KF_OFF = BAR_OFF), empty[NS] (KE_OFF), 8 bytes = 4 elements
    # each; kv_split: those are K's, then V's full[NS] (VF_OFF), empty[NS] (VE_OFF)
    BAR_OFF = V_OFF + NS * NP * KV_PANEL + (NP * Q_PANEL if O_STAGE else 0)
    NBAR = (4 if KVS else 2) * NS
    KF_OFF, KE_OFF, VF_OFF, VE_OFF = BAR_OFF, BAR_OFF + 4 * NS, BAR_OFF + 8 * NS, BAR_OFF + 12 * NS
    QF_BAR, QE_BAR = BAR_OFF + 4 * NBAR, BAR_OFF + 4 * NBAR + 4  # persistent: Q tile full / empty
    SMEM = BAR_OFF + (4 * NBAR if ws or tma else 0) + (8 if PERSIST else 0)
    Q_IT = BM * (D // 8) // LT  # 16-byte copies per thread
    assert BM * (D // 8) % LT == 0
    KV_REM = BN * (D // 8) % LT  # block_n * D/8 need not divide by the thread count
    KV_IT_ALL = (BN * (D // 8) + LT - 1) // LT
    # descriptor fields are in 16-byte units
    K_SBO = 1024 >> 4
    V_LBO, V_SBO = (KV_PANEL * 2) >> 4, 1024 >> 4  # checked on the GPU: the swapped order is wrong

    ab = PTX_TYPE[dtype]
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
    NEG_INF = -math.inf
    FULL = 0xFFFFFFFF
    # tma: one copy per 64-column panel of a tile; bytes a tile's copies complete on its barrier
    expect_tx = T.ptx["mbarrier.arrive.expect_tx.shared::cta.b64"]
    Q_TILE_BYTES, KV_TILE_BYTES = NP * Q_PANEL * 2, NP * KV_PANEL * 2

    @T.macro
    def load_kv(smem, k, v, bz, hk, Sk, tile, slot, tx):
        for it in T.unroll(KV_IT_ALL):
            e = it * LT + tx
            if KV_REM == 0 or e < BN * (D // 8):
                # e -> (panel, row, chunk-in-panel): a warp covers 4 rows x 8 chunks of one panel
                c8 = (e // (8 * BN)) * 8 + e % 8
                r = (e // 8) % BN
                kr = tile * BN + r
                so = slot * NP * KV_PANEL + (c8 // 8) * KV_PANEL + r * 64 + ((c8 % 8) ^ (r % 8)) * 8
                ok = T.if_then_else(kr < Sk, T.uint32(16), T.uint32(0))
                cp_async(T.address_of(smem[K_OFF + so]), T.address_of(k[bz, hk, T.min(kr, Sk - 1), c8 * 8]), 16, ok)
                cp_async(T.address_of(smem[V_OFF + so]), T.address_of(v[bz, hk, T.min(kr, Sk - 1), c8 * 8]), 16, ok)

    @body_macro
    def load_q(lt):
        # Q tile -> shared (zero-filled past Sq); lt: this thread's index among the LT loaders
        for it in T.unroll(Q_IT):
            e = it * LT + lt
            c8 = (e // (8 * BM)) * 8 + e % 8
            r = (e // 8) % BM
            cp_async(T.address_of(smem[(c8 // 8) * Q_PANEL + r * 64 + ((c8 % 8) ^ (r % 8)) * 8]),
                     T.address_of(q[bz, hq, T.min(m0 + r, Sq - 1), c8 * 8]), 16,
                     T.if_then_else(m0 + r < Sq, T.uint32(16), T.uint32(0)))

    tma_tile = tma_tile_macro(NP)
    encode = tensormap_macro(D, dtype)

    @body_macro
    def expect_slot(f_off, g, nbytes):
        # tma: ring slot g % NS's full barrier (of the array at f_off) expects nbytes more
        expect_tx(T.cuda.cvta_generic_to_shared(T.address_of(smem[f_off + 4 * (g % NS)])), nbytes)

    @body_macro
    def tma_slot(tm, tile_off, f_off, t, g):
        # tma: key tile t of tensor map tm into ring slot g % NS (g: ring position) of the tiles
        # at tile_off, completing on the slot's full barrier of the array at f_off
        tma_tile(tm, tile_off + (g % NS) * NP * KV_PANEL, KV_PANEL, t * BN, hk, f_off + 4 * (g % NS))

    @body_macro
    def tma_kv(t, g, expect):
        # tma: key tile t's K and V into ring slot g % NS, on the slot's one full barrier;
        # ``expect``: this call announces the slot's bytes (else an earlier expect_tx covered
        # them: tile 0 with Q)
        if expect:
            expect_slot(KF_OFF, g, 2 * KV_TILE_BYTES)
        tma_slot(tm_k, K_OFF, KF_OFF, t, g)
        tma_slot(tm_v, V_OFF, KF_OFF, t, g)

    @body_macro
    def wait_empty(e_off, g):
        # the loader: ring position g's slot was released (by every consumer warp) for the
        # tile NS positions before; nothing to wait for on the ring's first pass
        if g >= NS:
            _mbar("mbar_wait", T.address_of(smem[e_off + 4 * (g % NS)]), (g // NS - 1) % 2)

    @body_macro
    def split_kv_loads(kb):
        # kv_split: the key tiles of one query tile, K running one tile ahead of V (K_{t+1},
        # then V_t: the order the consumers use them in); tile 0's K was issued before
        for t in T.serial(n_blk):
            if t + 1 < n_blk:
                wait_empty(KE_OFF, kb + t + 1)
                expect_slot(KF_OFF, kb + t + 1, KV_TILE_BYTES)
                tma_slot(tm_k, K_OFF, KF_OFF, t + 1, kb + t + 1)
            wait_empty(VE_OFF, kb + t)
            expect_slot(VF_OFF, kb + t, KV_TILE_BYTES)
            tma_slot(tm_v, V_OFF, VF_OFF, t, kb + t)

    @body_macro
    def tma_q():
        # tma: the Q tile, on slot 0's full barrier, whose expected bytes include key tile 0's
        # (kv_split: K's only)
        expect_tx(T.cuda.cvta_generic_to_shared(T.address_of(smem[KF_OFF])),
                  Q_TILE_BYTES + (1 if KVS else 2) * KV_TILE_BYTES)
        tma_tile(tm_q, 0, Q_PANEL, m0, hq, KF_OFF)
        if KVS:
            tma_slot(tm_k, K_OFF, KF_OFF, 0, 0)

    @body_macro
    def producer_tma():
        # tma: one thread of the loader warpgroup; Q rides on tile 0's full barrier
        if tx == NWG * 128 and KVS:
            tma_q()  # with K_0
            split_kv_loads(0)
        elif tx == NWG * 128:
            tma_q()
            for t in T.serial(n_blk):
                wait_empty(KE_OFF, t)
                tma_kv(t, t, t > 0)

    @body_macro
    def producer_tile(kb, it):
        # persistent: one query tile's loads by the loader thread; the ring position of its key
        # tile t is kb + t (kb: key tiles this CTA loaded before); Q waits for the consumers to
        # release the previous tile's Q
        if KVS:  # the tile's first K before its Q, which waits for the previous tile's release
            wait_empty(KE_OFF, kb)
            expect_slot(KF_OFF, kb, KV_TILE_BYTES)
            tma_slot(tm_k, K_OFF, KF_OFF, 0, kb)
        if it > 0:
            _mbar("mbar_wait", T.address_of(smem[QE_BAR]), (it - 1) % 2)
        expect_tx(T.cuda.cvta_generic_to_shared(T.address_of(smem[QF_BAR])), Q_TILE_BYTES)
        tma_tile(tm_q, 0, Q_PANEL, m0, hq, QF_BAR)
        if KVS:
            split_kv_loads(kb)
        else:
            for t in T.serial(n_blk):
                wait_empty(KE_OFF, kb + t)
                tma_kv(t, kb + t, True)

    @body_macro
    def producer():
        # the loader warpgroup (ws): Q, then K/V tile t into ring slot t % NS once the consumers
        # have released the tile that held it (empty barrier), then an arrive on the slot's full
        # barrier that fires when this thread's copies have landed (128 arrivals per phase)
        if REG_SPLIT:
            _setmaxnreg("dec", R_LOADER)
        load_q(tx - NWG * 128)
        for t in T.serial(n_blk):
            wait_empty(KE_OFF, t)
            load_kv(smem, k, v, bz, hk, Sk, t, t % NS, tx - NWG * 128)
            _mbar("cp_async_arrive", T.address_of(smem[KF_OFF + 4 * (t % NS)]))
        commit()  # the loader's copies were never committed to a group: commit, then wait for
        wait_group(0)  # them all before its threads exit (cp.async.wait_all)

    @body_macro
    def wait_full(f_off, jt):
        # ws or tma: tile jt landed (the loader's copies; the full barriers at f_off: KF_OFF,
        # or kv_split's V ones at VF_OFF), then visible to the async proxy
        _mbar("mbar_wait", T.address_of(smem[f_off + 4 * (jt % NS)]), (jt // NS) % 2)
        fence_proxy()

    @body_macro
    def release_q():
        # persistent: this warp's Q K^T wgmmas are all complete; the loader may load the next Q
        if PERSIST and lane == 0:
            _mbar("mbar_arrive", T.address_of(smem[QE_BAR]))

    @body_macro
    def release(e_off, jt):
        # ws: this warp no longer reads tile jt (one arrival per consumer warp on the empty
        # barriers at e_off: KE_OFF, or kv_split's V ones at VE_OFF)
        if lane == 0:
            _mbar("mbar_arrive", T.address_of(smem[e_off + 4 * (jt % NS)]))

    pack_frag = pack_frag_macro(pack2)

    # The loop body's pieces (hygienic=False: they use the kernel's local names).
    @body_macro
    def issue_s(sb, slot):
        # S = Q K^T of the tile in ring slot `slot`, both from shared memory; committed, not waited
        wg_fence()
        for kd in T.unroll(0 if AB_S else KD):
            wg_ss(*[sb[i] for i in range(SACC)],
                  desc[0] + T.uint64(((kd // 4) * Q_PANEL * 2 + (kd % 4) * 32) >> 4),
                  desc[1] + T.uint64(((slot * NP + kd // 4) * KV_PANEL * 2 + (kd % 4) * 32) >> 4),
                  kd > 0, 1, 1, 0, 0)
        wg_commit()

    @body_macro
    def mask_tile(sb, jt):
        # -inf past Sk and (causal) above the diagonal: key-tail / diagonal tiles only
        n0 = jt * BN
        if (n0 + BN > Sk) or (causal and n0 + BN - 1 > m0 + wg * 64):
            for nt, hh, e2 in T.grid(BN // 8, 2, 2):
                row = m0 + wg * 64 + warp * 16 + g + hh * 8
                col = n0 + nt * 8 + t4 * 2 + e2
                if (col >= Sk) or (causal and col > row):
                    sb[nt * 4 + hh * 2 + e2] = T.float32(NEG_INF)

    @body_macro
    def row_softmax(sb, hh, ab, ai):
        # online softmax of row half hh (8 rows apart per quad): new max (quad shuffles), O's
        # rescale factor into ab[ai], P = exp2(S * scale*log2e - max) in place, l updated
        red[0] = m_i[hh]
        for nt, e2 in T.grid(BN // 8, 2):
            red[0] = T.max(red[0], sb[nt * 4 + hh * 2 + e2])
        red[0] = T.max(red[0], T.tvm_warp_shuffle_xor(T.uint32(FULL), red[0], 1, 32, 32))
        red[0] = T.max(red[0], T.tvm_warp_shuffle_xor(T.uint32(FULL), red[0], 2, 32, 32))
        mu[0] = T.if_then_else(red[0] == T.float32(NEG_INF), T.float32(0), red[0])
        ex2(ab[ai], (m_i[hh] - mu[0]) * sl2)
        m_i[hh] = red[0]
        red[0] = mu[0] * sl2
        for nt, e2 in T.grid(BN // 8, 2):
            if AB_EXP:
                sb[nt * 4 + hh * 2 + e2] = sb[nt * 4 + hh * 2 + e2] * sl2 - red[0]
            else:
                ex2(sb[nt * 4 + hh * 2 + e2], sb[nt * 4 + hh * 2 + e2] * sl2 - red[0])
        l_i[hh] = l_i[hh] * ab[ai]
        for nt, e2 in T.grid(BN // 8, 2):
            l_i[hh] = l_i[hh] + sb[nt * 4 + hh * 2 + e2]

    @body_macro
    def issue_pv(slot):
        # O += P V with P from registers and V (MN-major) from ring slot `slot`; committed, not waited
        wg_fence()
        if not AB_PV:
            for kn in T.unroll(KN):
                wg_rs(*[acc[i] for i in range(OACC)],
                      pf[kn * 4 + 0], pf[kn * 4 + 1], pf[kn * 4 + 2], pf[kn * 4 + 3],
                      desc[2] + T.uint64((slot * NP * KV_PANEL * 2 + kn * 16 * 128) >> 4),
                      True, 1, 1, 1)
        wg_commit()

    @body_macro
    def softmax_pv(sb, jt, slot):
        # plain order: masking, online softmax with O *= alpha row by row, then P V issued
        mask_tile(sb, jt)
        for hh in T.unroll(2):
            row_softmax(sb, hh, alpha, 0)
            for dt, e2 in T.grid(D // 8, 2):
                acc[dt * 4 + hh * 2 + e2] = acc[dt * 4 + hh * 2 + e2] * alpha[0]
        pack_frag(pf, sb, KN)
        issue_pv(slot)

    @body_macro
    def refill_softmax_pv(sb, jt, slot):
        # after the wait that completed S_jt and P V_{jt-1}: pin their registers; once every
        # warpgroup is past that wait, tile jt-1's ring slot is free: refill it; then softmax + P V
        pin_all(sb, SACC)
        pin_all(acc, OACC)
        if not AB_SYNC:
            T.tvm_storage_sync("shared")
        if tma:  # one thread refills by TMA; the slot's full barrier tells everyone
            if tx == 0 and jt + NS - 1 < n_blk and not AB_LOAD:
                tma_kv(jt + NS - 1, jt + NS - 1, True)
        else:
            if jt + NS - 1 < n_blk and not AB_LOAD:
                load_kv(smem, k, v, bz, hk, Sk, jt + NS - 1, (jt + NS - 1) % NS, tx)
            commit()
        softmax_pv(sb, jt, slot)

    # FA3's intra-warpgroup order (overlap=1): the softmax of tile j+1 (softmax_rows) runs on the
    # CUDA cores while P V_j (rescale_issue_pv, issued just before) runs on the tensor cores
    @body_macro
    def softmax_rows(sb, jt):
        # masking and online softmax of S_jt; each row half's rescale factor of O left in al2
        mask_tile(sb, jt)
        for hh in T.unroll(2):
            row_softmax(sb, hh, al2, hh)

    @body_macro
    def rescale_issue_pv(slot):
        # O *= alpha (rows' max moved), then O += P V of the tile in ring slot `slot`; committed
        for dt, hh, e2 in T.grid(D // 8, 2, 2):
            acc[dt * 4 + hh * 2 + e2] = acc[dt * 4 + hh * 2 + e2] * al2[hh]
        issue_pv(slot)

    @body_macro
    def turn_wait():
        # pingpong: wait for this warpgroup's turn to issue wgmmas
        if pingpong:
            _named_bar("sync", 1 + wg, 256)

    @body_macro
    def turn_pass(last):
        # pingpong: the next warpgroup's turn (the last warpgroup's final pass is skipped: it
        # passed once before its loop)
        if pingpong and not (last and wg == NWG - 1):
            _named_bar("arrive", 1 + (wg + 1) % NWG, 256)

    @body_macro
    def consumer(kb, it):
        # accumulators, descriptors, the key loop and the epilogue of one consumer warpgroup;
        # kb: the ring position of the first key tile (persistent: key tiles consumed before,
        # else 0), it: the CTA's query-tile count so far (persistent: Q barrier phase)
        for i in T.serial(OACC):
            acc[i] = T.float32(0)
        for hh in T.serial(2):
            m_i[hh] = T.float32(NEG_INF)
            l_i[hh] = T.float32(0)
        # base descriptors: Q (this warpgroup's 64 rows), K slot 0, V slot 0
        T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc[0]), T.address_of(smem[wg * 64 * 64]), 1, K_SBO, 3)
        T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc[1]), T.address_of(smem[K_OFF]), 1, K_SBO, 3)
        T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc[2]), T.address_of(smem[V_OFF]), V_LBO, V_SBO, 3)

        if PERSIST:
            _mbar("mbar_wait", T.address_of(smem[QF_BAR]), it % 2)
        if ws and not overlap:
            for j in T.serial(n_blk):
                wait_full(KF_OFF, kb + j)
                issue_s(s, (kb + j) % NS)
                wg_wait(0)  # S_j and the previous P V are complete
                pin_all(s, SACC)
                pin_all(acc, OACC)
                if j > 0:
                    release(KE_OFF, kb + j - 1)
                softmax_pv(s, j, (kb + j) % NS)
                if not defer_pv_wait:
                    wg_wait(0)
                    pin_all(acc, OACC)
            release_q()
        elif ws:
            # FA3 order (see below) with the loader warpgroup's barriers; with pingpong every
            # wgmma issue is one turn of the round robin between the consumer warpgroups
            # (kv_split: K_j released once S_j is complete, V_j after P V_j; V waited for
            # separately, before the turn that issues P V_j)
            if pingpong and wg == NWG - 1:
                _named_bar("arrive", 1, 256)  # warpgroup 0 goes first
            wait_full(KF_OFF, kb)
            turn_wait()
            issue_s(s, kb % NS)
            turn_pass(False)
            wg_wait(0)
            pin_all(s, SACC)
            if KVS:
                release(KE_OFF, kb)
            softmax_rows(s, 0)
            pack_frag(pf, s, KN)
            for j in T.serial(n_blk - 1):
                wait_full(KF_OFF, kb + j + 1)
                if KVS:
                    wait_full(VF_OFF, kb + j)
                turn_wait()
                issue_s(s, (kb + j + 1) % NS)
                rescale_issue_pv((kb + j) % NS)
                turn_pass(False)
                wg_wait(1)  # S_{j+1} complete; P V_j in flight
                pin_all(s, SACC)
                if KVS:
                    release(KE_OFF, kb + j + 1)
                softmax_rows(s, j + 1)
                wg_wait(0)
                pin_all(acc, OACC)
                if KVS:
                    release(VE_OFF, kb + j)
                else:
                    release(KE_OFF, kb + j)
                pack_frag(pf, s, KN)
            release_q()
            if KVS:
                wait_full(VF_OFF, kb + n_blk - 1)
            turn_wait()
            rescale_issue_pv((kb + n_blk - 1) % NS)
            turn_pass(True)
        elif not overlap:
            for j in T.serial(n_blk):
                if tma:
                    wait_full(KF_OFF, j)  # tile j (and Q) landed, by the TMA unit's count of bytes
                else:
                    wait_group(NS - 2)  # tile j (and Q) landed: own copies
                    fence_proxy()  # ... visible to the tensor cores' async proxy
                    if not AB_SYNC:
                        T.tvm_storage_sync("shared")  # ... and everyone's copies
                slot = j % NS
                issue_s(s, slot)
                wg_wait(0)  # S_j and the previous P V are complete
                refill_softmax_pv(s, j, slot)
                if not defer_pv_wait:
                    wg_wait(0)
                    pin_all(acc, OACC)
        else:
            # FA3 order.  Prologue: S_0 and its softmax.  Step j: refill the slot
            # tile j-1 left, issue S_{j+1}, O *= alpha_j, issue P V_j; wait for
            # S_{j+1} and run its softmax while P V_j is on the tensor cores; wait
            # for P V_j (its P registers are read asynchronously), pack P_{j+1}.
            # Tile j+1 must have landed at step j: issued at step j-1 into the slot
            # tile j-2 left, so num_stages >= 3.  The last P V is peeled off the loop.  With tma, thread 0
            # refills by TMA and everyone waits on the slot's full barrier (v13).
            if tma:
                wait_full(KF_OFF, 0)  # tile 0 (and Q) landed
            else:
                wait_group(NS - 2)
                fence_proxy()
                T.tvm_storage_sync("shared")
            issue_s(s, 0)
            wg_wait(0)
            pin_all(s, SACC)
            softmax_rows(s, 0)
            pack_frag(pf, s, KN)
            for j in T.serial(n_blk - 1):
                if tma:
                    wait_full(KF_OFF, j + 1)  # tile j+1 landed
                    T.tvm_storage_sync("shared")  # everyone past step j-1: its slot is free
                    if tx == 0 and j + NS - 1 < n_blk:
                        tma_kv(j + NS - 1, j + NS - 1, True)
                else:
                    wait_group(NS - 3)  # tile j+1 landed: own copies
                    fence_proxy()
                    T.tvm_storage_sync("shared")  # everyone's copies; slot of j-1 free
                    if j + NS - 1 < n_blk:
                        load_kv(smem, k, v, bz, hk, Sk, j + NS - 1, (j + NS - 1) % NS, tx)
                    commit()
                issue_s(s, (j + 1) % NS)
                rescale_issue_pv(j % NS)
                wg_wait(1)  # S_{j+1} complete; P V_j in flight
                pin_all(s, SACC)
                softmax_rows(s, j + 1)
                wg_wait(0)
                pin_all(acc, OACC)
                pack_frag(pf, s, KN)
            rescale_issue_pv((n_blk - 1) % NS)

        wg_wait(0)
        pin_all(acc, OACC)
        if PERSIST and KVS:
            release(VE_OFF, kb + n_blk - 1)  # the last key tile's V slot (the loader runs on)
        elif PERSIST:
            release(KE_OFF, kb + n_blk - 1)  # the ring slot of the last key tile (the loader runs on)
        # ---- epilogue: O / l and LSE ----
        if O_STAGE:  # the last tile's TMA stores have read this warpgroup's O tile
            if tx % 128 == 0:
                asm_call("bulk_wait_read")
            _named_bar("sync", 1 + NWG + wg, 128)
        for hh in T.unroll(2):
            red[0] = l_i[hh]
            red[0] = red[0] + T.tvm_warp_shuffle_xor(T.uint32(FULL), red[0], 1, 32, 32)
            red[0] = red[0] + T.tvm_warp_shuffle_xor(T.uint32(FULL), red[0], 2, 32, 32)
            row = m0 + wg * 64 + warp * 16 + g + hh * 8
            if tma_store:  # O / l into this warpgroup's Q rows, or its O tile rows (row % 8 = g: chunk dt ^ g)
                alpha[0] = T.if_then_else(red[0] > T.float32(0), T.float32(1) / red[0], T.float32(0))
                for dt in T.unroll(D // 8):
                    pack2(pk[0], acc[dt * 4 + hh * 2 + 1] * alpha[0], acc[dt * 4 + hh * 2] * alpha[0])
                    asm_call("st_shared_u32", T.address_of(smem[EPI_OFF + (dt // 8) * Q_PANEL + (wg * 64 + warp * 16 + g + hh * 8) * 64
                                                            + ((dt % 8) ^ g) * 8 + t4 * 2]), pk[0])
                if row < Sq and t4 == 0:
                    lse[bz, hq, row] = (m_i[hh] * sl2 + T.log2(red[0])) * T.float32(LN2)
            elif row < Sq and (not AB_OUT or sl2 < T.float32(0)):  # ablate o: scale >= 0, so never
                alpha[0] = T.if_then_else(red[0] > T.float32(0), T.float32(1) / red[0], T.float32(0))
                for dt in T.unroll(D // 8):
                    pack2(pk[0], acc[dt * 4 + hh * 2 + 1] * alpha[0], acc[dt * 4 + hh * 2] * alpha[0])
                    o32[(((bz * Hq + hq) * Sq + row) * D + dt * 8 + t4 * 2) // 2] = pk[0]
                if t4 == 0:
                    lse[bz, hq, row] = (m_i[hh] * sl2 + T.log2(red[0])) * T.float32(LN2)
        if tma_store:  # visible to the async proxy, then the warpgroup's first thread stores them
            fence_proxy()
            _named_bar("sync", 1 + NWG + wg, 128)  # (1..NWG: the ping-pong's)
            if tx % 128 == 0:
                for p in T.unroll(NP):
                    asm_call("tma_store_4d", T.address_of(smem[EPI_OFF + p * Q_PANEL + wg * 64 * 64]), T.address_of(tm_o),
                         p * 64, m0 + wg * 64, hq, bz)
                asm_call("bulk_commit")
                if not O_STAGE:  # shared memory must outlive the copies' reads (persistent: the
                    asm_call("bulk_wait_read")  # next epilogue waits, and the CTA's end)

    @body_macro
    def init_barriers():
        # ws or tma: full / empty mbarrier per ring slot (+ Q full / empty when persistent; the
        # all-threads TMA loop uses only the full ones)
        if tx == 0:
            for i in T.unroll(NBAR):  # full barriers: i % (2 NS) < NS
                _mbar("mbar_init", T.address_of(smem[BAR_OFF + 4 * i]), (1 if tma else 128) if i % (2 * NS) < NS else NWG * 4)
            if PERSIST:
                _mbar("mbar_init", T.address_of(smem[QF_BAR]), 1)
                _mbar("mbar_init", T.address_of(smem[QE_BAR]), NWG * 4)
            if tma:
                T.ptx["fence.mbarrier_init.release.cluster"]()
        T.tvm_storage_sync("shared")

    @body_macro
    def tile(bx, hq, bz, job):
        # query tile bx of (head hq, batch bz): its coordinates, then the job: "cta" (a CTA per
        # tile), or persistent "load" (the loader thread) / "compute" (a consumer warpgroup),
        # each keeping its count of key tiles so far in kvb[0] (the ring position)
        m_blk = T.if_then_else(causal, (Sq + BM - 1) // BM - 1 - bx, bx)
        m0 = m_blk * BM
        hk = hq // (Hq // Hkv)
        kv_len = T.if_then_else(causal, T.min(T.min(m0 + BM, Sq), Sk), Sk)
        n_blk = (kv_len + BN - 1) // BN
        if job == "load":
            producer_tile(kvb[0], it)
            kvb[0] = kvb[0] + n_blk
        elif job == "compute":
            consumer(kvb[0], it)
            kvb[0] = kvb[0] + n_blk
        elif ws:
            # warp specialized: the last warpgroup loads (TMA or cp.async; mbarriers full /
            # empty per ring slot), the others compute
            init_barriers()
            if wg == NWG:
                if tma:
                    if REG_SPLIT:
                        _setmaxnreg("dec", R_LOADER)
                    producer_tma()
                else:
                    producer()
            else:
                if REG_SPLIT:
                    _setmaxnreg("inc", R_CONSUMER)
                consumer(0, 0)
        else:
            # ---- Q tile -> shared (zero-filled past Sq), first NS-1 K/V tiles ----
            if tma:  # thread 0 issues them; full mbarrier per ring slot
                init_barriers()
                if tx == 0:
                    tma_q()
                    for st in T.unroll(NS - 1):
                        if st < n_blk:
                            tma_kv(st, st, st > 0)
            else:
                load_q(tx)
                for st in T.unroll(NS - 1):
                    if st < n_blk:
                        load_kv(smem, k, v, bz, hk, Sk, st, st, tx)
                    commit()

            consumer(0, 0)

    @body_macro
    def tile_of(tid, job):
        # persistent: tile id -> (query tile, head, batch): query tile fastest, as the
        # one-CTA-per-tile launch orders them, or (tile_order 1) slowest, so that the P tiles a
        # round of the CTAs takes are the same query tile of P heads: with causal masking
        # (query tiles walked from the last, the heaviest, down) equal work, where query tile
        # fastest gives CTA c always tile c % m_tiles when P is a multiple of m_tiles
        if bool(tile_order):
            tile(tid // (Hq * B), tid % Hq, (tid // Hq) % B, job)
        else:
            tile(tid % m_tiles, (tid // m_tiles) % Hq, tid // (m_tiles * Hq), job)

    @body_macro
    def persistent_cta():
        # persistent: CTA bx walks the tiles bx, bx + P, ... (P = n_cta CTAs; tile_of)
        init_barriers()
        kvb[0] = 0
        if wg == NWG:
            if REG_SPLIT:
                _setmaxnreg("dec", R_LOADER)
            if tx == NWG * 128:
                for it in T.serial((n_tiles - bx + n_cta - 1) // n_cta):
                    tid = bx + it * n_cta
                    tile_of(tid, "load")
        else:
            if REG_SPLIT:
                _setmaxnreg("inc", R_CONSUMER)
            for it in T.serial((n_tiles - bx + n_cta - 1) // n_cta):
                tid = bx + it * n_cta
                tile_of(tid, "compute")
            if O_STAGE and tx % 128 == 0:  # the last tile's TMA stores have read shared memory
                asm_call("bulk_wait_read")

    @body_macro
    def grid():
        # the launch: one CTA per (query tile, q-head, batch), or (persistent) a fixed number
        for bx in T.thread_binding(T.min(persistent, ((Sq + BM - 1) // BM * Hq * B)) if PERSIST else ((Sq + BM - 1) // BM), thread="blockIdx.x"):
            for hq in T.thread_binding(1 if PERSIST else Hq, thread="blockIdx.y"):
                for bz in T.thread_binding(1 if PERSIST else B, thread="blockIdx.z"):
                    smem = T.alloc_buffer((SMEM,), dtype, scope="shared.dyn", align=1024)
                    for tx in T.thread_binding(NT, thread="threadIdx.x"):
                        s = T.alloc_buffer((SACC,), "float32", scope="local")
                        acc = T.alloc_buffer((OACC,), "float32", scope="local")
                        pf = T.alloc_buffer((KN * 4,), "uint32", scope="local")
                        desc = T.alloc_buffer((3,), "uint64", scope="local")
                        m_i = T.alloc_buffer((2,), "float32", scope="local")
                        l_i = T.alloc_buffer((2,), "float32", scope="local")
                        red = T.alloc_buffer((1,), "float32", scope="local")
                        alpha = T.alloc_buffer((1,), "float32", scope="local")
                        al2 = T.alloc_buffer((2,), "float32", scope="local")
                        mu = T.alloc_buffer((1,), "float32", scope="local")
                        pk = T.alloc_buffer((1,), "uint32", scope="local")
                        kvb = T.alloc_buffer((1,), "int32", scope="local")
                        wg = tx // 128
                        warp = (tx % 128) // 32
                        lane = tx % 32
                        g = lane // 4
                        t4 = lane % 4
                        sl2 = scale * T.float32(LOG2E)
                        if PERSIST:
                            m_tiles = (Sq + BM - 1) // BM  # query tiles per (head, batch)
                            n_tiles = m_tiles * Hq * B
                            n_cta = T.min(persistent, n_tiles)
                            persistent_cta()
                        else:
                            tile(bx, hq, bz, "cta")

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
        if tma:  # tensor maps of q, k, v, boxes of one panel x the tile's rows
            tm_q = T.Bind(T.tvm_stack_alloca("tensormap", 1))
            encode(tm_q, q, Sq, Hq, BM)
            tm_k = T.Bind(T.tvm_stack_alloca("tensormap", 1))
            encode(tm_k, k, Sk, Hkv, BN)
            tm_v = T.Bind(T.tvm_stack_alloca("tensormap", 1))
            encode(tm_v, v, Sk, Hkv, BN)
            if tma_store:  # O: boxes of one panel x one warpgroup's 64 rows
                tm_o = T.Bind(T.tvm_stack_alloca("tensormap", 1))
                encode(tm_o, o, Sq, Hq, 64)
                grid()
            else:
                grid()
        else:
            grid()
    # fmt: on
    return flash_fwd


KNOB_SPACE = {
    "num_wg": [1, 2, 3],
    "block_n": [32, 48, 64, 80, 96, 112, 128, 176],
    "num_stages": [2, 3, 4],
    "defer_pv_wait": [0, 1],
    "ws": [0, 1],
    "overlap": [0, 1],
    "pingpong": [0, 1],
    "tma": [0, 1],
    "kv_split": [0, 1],  # needs ws, tma and overlap: the tuner skips the sets check_knobs refuses
}


def supports(head_dim: int, dtype: str) -> bool:
    """fp16/bf16 with a head dim of 64, 128, 192 or 256 (128-byte-swizzled 64-column panels)."""
    return dtype in PTX_TYPE and head_dim % 64 == 0 and 64 <= head_dim <= 256


def default_knobs(head_dim: int, dtype: str, causal: bool = False) -> dict:
    """The best of knob sweeps on the H200 (bf16, 16k tokens, kernel alone; docs/perf-notes.md
    v3-v5, v9, v11).  hd64: one warpgroup computes, thread 0 loads by TMA (no loader warpgroup),
    128-key tiles, 2 slots: seq 4096 / 16k 466 / 458 TFLOP/s non-causal, 415 / 447 causal (vs 413
    / 380 at 4096 for v5's two all-threads-loading warpgroups; 64-key tiles 446 / 447 and 410 /
    431).  hd128 warp specialized with FA3's intra- and inter-warpgroup (ping-pong) order,
    128-key tiles, 3 slots, TMA loader: 392-625 / 247-614 over seq 512-16k.  Every head dim:
    the epilogue by TMA stores (v14: hd128 seq 512 / 2048 392 -> 434 / 546 -> 597, causal seq
    512 / 4096 248 -> 282 / 518 -> 552; hd64 short kernel +3-4%; hd256 seq 1024 +7%).  hd192 and
    hd256: K and V in separate 2-slot rings (v16), whose room takes 96- / 80-key tiles: seq 4096
    hd192 650 / 554 (non-causal with ping-pong / causal; 3 shared slots of 64 keys: 602 / 533),
    hd256 631 / 566 (48 keys: 578 / 508)."""
    if head_dim <= 64:
        return {"num_wg": 1, "block_n": 128, "num_stages": 2, "defer_pv_wait": int(not causal), "ws": 0, "overlap": 0,
                "tma": 1, "tma_store": 1}
    ws = {"num_wg": 2, "defer_pv_wait": 0, "ws": 1, "overlap": 1, "pingpong": 0, "tma": 1, "tma_store": 1}
    if head_dim <= 128:
        return {**ws, "block_n": 128, "num_stages": 3, "pingpong": 1}
    if head_dim <= 192:
        return {**ws, "block_n": 96, "num_stages": 2, "kv_split": 1, "pingpong": int(not causal)}
    return {**ws, "block_n": 80, "num_stages": 2, "kv_split": 1}


# hd192 / hd256 ring shape (block_n, num_stages) of the defaults before v16 (one shared K/V ring),
# for records that turn off what the split rings need
_SHARED_RING = {192: (64, 3), 256: (48, 3)}


def short_knobs(head_dim: int, dtype: str, causal: bool, max_seq_k: int = 2048, sms: int | None = None) -> dict | None:
    """Knobs for every key length up to ``max_seq_k`` (``tvm_flash.ops`` picks the kernel per call
    from its length classes, 1024 and 2048), where a CTA's fixed cost (Q tile, epilogue) weighs
    most, or None (the defaults serve those lengths too).  ``sms``: the GPU's SM count (the
    persistent kernel's CTA count; None: no persistent kernel).  Kernel alone on the H200, bf16,
    16k tokens:

    * hd64 (up to 2048): 64-key tiles, the P.V wait not deferred: seq 512 / 1024 / 2048 377 /
      422 / 437 TFLOP/s non-causal (128-key tiles 347 / 406 / 420), 282 / 350 / 384 causal
      (249 / 310 / 372) (perf-notes v11);
    * hd128 non-causal (up to 1024): persistent CTAs with K and V in separate 2-slot rings and
      the TMA-store epilogue from an O tile of its own: seq 512 / 1024 481 / 541 (defaults
      434 / 528), fp16 463 / 523 (431 / 509); at 2048 no better in bf16, 8% slower in fp16;
      causal masking loses with it (perf-notes v16)."""
    if head_dim <= 64:
        return {**default_knobs(head_dim, dtype, causal), "block_n": 64, "defer_pv_wait": 0}
    if head_dim == 128 and not causal and max_seq_k <= 1024 and sms:
        return {**default_knobs(head_dim, dtype, causal), "kv_split": 1, "num_stages": 2, "persistent": sms,
                "tma_store": 1}
    return None


def merge_knobs(head_dim: int, dtype: str, causal: bool, knobs: dict) -> dict:
    """``knobs`` over the defaults; a default ``pingpong`` is dropped where the given knobs leave
    no two consumer warpgroups in the FA3 order to alternate (e.g. a record without the knob),
    a default ``tma`` where they ask for the FA3 order without a loader warpgroup (that loop's
    TMA form, v13, is exact but slower than the defaults; such records keep the cp.async loop
    they were timed with), a default ``tma_store`` where they turn ``tma`` off or ask for
    ``persistent`` CTAs (there O needs a tile of its own, which the default ring leaves no room
    for), a default ``kv_split`` (hd192/256) where they leave no loader warpgroup with TMA in the
    FA3 order, or give a ring shape of their own (``block_n`` / ``num_stages``: timed with the
    shared ring)."""
    k = {**default_knobs(head_dim, dtype, causal), **knobs}
    if "pingpong" not in knobs and not (k.get("ws") and k.get("overlap") and k["num_wg"] >= 2):
        k["pingpong"] = 0
    if "tma" not in knobs and not k.get("ws") and k.get("overlap"):
        k["tma"] = 0
    if "tma_store" not in knobs and (not k.get("tma") or k.get("persistent")):
        k["tma_store"] = 0
    if "kv_split" not in knobs and k.get("kv_split") and (
            not (k.get("ws") and k.get("tma") and k.get("overlap")) or "block_n" in knobs or "num_stages" in knobs):
        k["kv_split"] = 0  # ... and the ring's shape the defaults had before (v16) where not given
        k.update({n: v for n, v in zip(("block_n", "num_stages"), _SHARED_RING[head_dim]) if n not in knobs})
    return k


def check_knobs(head_dim: int, dtype: str, causal: bool, knobs: dict) -> None:
    k = merge_knobs(head_dim, dtype, causal, knobs)
    _check(head_dim, dtype, k["num_wg"], k["block_n"], k["num_stages"], bool(k.get("overlap", False)),
           bool(k.get("ws", False)), bool(k.get("pingpong", False)), bool(k.get("tma", False)),
           int(k.get("persistent", 0)), bool(k.get("tma_store", False)), bool(k.get("kv_split", False)),
           int(k.get("tile_order", 0)))
    if k.get("overlap") and not k.get("ws") and k["num_stages"] < 3:
        raise ValueError("overlap needs num_stages >= 3 (or ws)")


def schedule(head_dim: int, dtype: str, causal: bool, **knobs) -> tvm.tirx.PrimFunc:
    knobs = merge_knobs(head_dim, dtype, causal, knobs)
    for name in ("defer_pv_wait", "overlap", "ws", "pingpong", "tma", "tma_store", "kv_split"):  # (persistent: a CTA count)
        if knobs.get(name) is not None:
            knobs[name] = bool(knobs[name])
    return forward_wgmma(head_dim, dtype, causal, **knobs)
