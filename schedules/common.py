"""Schedule helpers shared by the target schedules: the phase blocks of the generic compute
(``cpu``, ``cuda_simt``), and the pieces the hand-written CUDA kernels share (shared-memory
limit, PTX type names, the register pin after ``wgmma.wait_group``, inline-asm helpers,
closure-aware TVMScript macros).  Part of every kernel's cache key (``tvm_flash.build._source_hash``)."""

import inspect

from tvm.script import tirx as T
from tvm.script.parser.core.utils import inspect_function_capture

MAX_SMEM = 232448  # bytes of (dynamic) shared memory one block may use on sm_90
PTX_TYPE = {"float16": "f16", "bfloat16": "bf16"}  # dtype -> PTX type name of mma/wgmma/cvt

# An empty volatile asm that reads and writes one register (by reference), issued after
# wgmma.wait_group (``pin_all``): later reads of the register depend on it, so the C++ compiler
# cannot hoist them above the wait (it does not see wgmma's asynchronous register writes).
PIN_SRC = """
__forceinline__ __device__ void tvm_flash_pin(float& r) { asm volatile("" : "+f"(r) :: "memory"); }
"""


# Inline-asm device functions the hand-written kernels share, called with ``asm_call(name,
# *args)``: name -> (C parameters, PTX, asm input operands), with a memory clobber; the C
# function is ``tvm_flash_<name>`` (TVM emits a func_call's source once per function name).
# Shared-memory stores go through these so TVM's barrier pass does not see them (the kernels
# order them with explicit barriers).  The bulk ops: the epilogue's TMA stores (forward) and
# dQ's bulk reductions (backward ``dq_accum``); a bulk group is waited for by the thread that
# committed it.
_SMEM_P = '"r"((unsigned)__cvta_generic_to_shared(p))'
ASM = {
    "st_shared_f32": ("void* p, float v", "st.shared.f32 [%0], %1;", _SMEM_P + ', "f"(v)'),
    "st_shared_u32": ("void* p, unsigned v", "st.shared.b32 [%0], %1;", _SMEM_P + ', "r"(v)'),
    "st_shared_v4": ("void* p, float a, float b, float c, float d", "st.shared.v4.f32 [%0], {%1, %2, %3, %4};",
                     _SMEM_P + ', "f"(a), "f"(b), "f"(c), "f"(d)'),
    # a (64 rows x 64 columns) box of the 4-d tensor map from shared memory
    "tma_store_4d": ("void* s, unsigned long long tmap, int c0, int c1, int c2, int c3",
                     "cp.async.bulk.tensor.4d.global.shared::cta.bulk_group [%0, {%2, %3, %4, %5}], [%1];",
                     '"l"(tmap), "r"((unsigned)__cvta_generic_to_shared(s)), "r"(c0), "r"(c1), "r"(c2), "r"(c3)'),
    # 16 KB (a 64 x 64 fp32 tile) of shared memory added element-wise into global memory (each
    # element's add is atomic: CTAs and warpgroups may add into one tile), committed as a group
    "bulk_reduce_add": ("float* g, void* s",
                        "cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], 16384;\\n"
                        "cp.async.bulk.commit_group;",
                        '"l"(g), "r"((unsigned)__cvta_generic_to_shared(s))'),
    # the same with an L2 evict-last policy (FA3's: the buffer every key tile adds into stays in L2)
    "bulk_reduce_add_hint": ("float* g, void* s",
                             "{\\n .reg .b64 pol;\\n createpolicy.fractional.L2::evict_last.b64 pol, 1.0;\\n"
                             " cp.reduce.async.bulk.global.shared::cta.bulk_group.L2::cache_hint.add.f32 [%0], [%1], 16384, pol;\\n"
                             " cp.async.bulk.commit_group;\\n}",
                             '"l"(g), "r"((unsigned)__cvta_generic_to_shared(s))'),
    "bulk_commit": ("", "cp.async.bulk.commit_group;", ""),
    "bulk_wait_read": ("", "cp.async.bulk.wait_group.read 0;", ""),  # this thread's groups have read their source
    "bulk_wait": ("", "cp.async.bulk.wait_group 0;", ""),  # ... and completed
}


def asm_call(name, *args):
    """Call the inline-asm device function ``name`` of ``ASM``."""
    param, asm, operands = ASM[name]
    src = (f"__forceinline__ __device__ void tvm_flash_{name}({param}) {{\n"
           f'  asm volatile("{asm}" :: {operands} : "memory");\n}}\n')
    return T.cuda.func_call(f"tvm_flash_{name}", *args, source_code=src)


def body_macro(fn):
    """``T.macro(hygienic=False)`` (the body sees the kernel's local names at the use site)
    that also sees its own closure: TVM's non-hygienic macros drop it, so the captured names
    are bound as keyword-only parameters with defaults (TVM binds a macro's defaults)."""
    sig = inspect.signature(fn)
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=value)
             for name, value in inspect_function_capture(fn).items() if name not in sig.parameters]
    fn.__signature__ = sig.replace(parameters=[*sig.parameters.values(), *extra])
    return T.macro(hygienic=False)(fn)


# Phase blocks of tvm_flash.compute.flash_forward.  "Row" phases have one loop
# (tx) above the block; the others have (tx, i): worker and element.
ROW_PHASES = ("init_rows", "row_max", "row_sum", "store_lse")
ELEM_PHASES = ("load_q", "load_kv", "qk", "exp", "pv", "store_o")


def phase_loops(sch):
    """Yield (name, tx_loop, i_loop or None) for every phase block."""
    for name in ROW_PHASES:
        yield name, sch.get_loops(sch.get_sblock(name))[-1], None
    for name in ELEM_PHASES:
        loops = sch.get_loops(sch.get_sblock(name))
        yield name, loops[-2], loops[-1]


def tile_loop(sch):
    """The loop over (batch, head, query tile)."""
    return sch.get_loops(sch.get_sblock("tile"))[0]


@T.macro
def pin_all(buf, n):
    """Pin ``n`` registers of ``buf`` after ``wgmma.wait_group`` (the C++ compiler must not move
    their reads above it: it cannot see wgmma's asynchronous writes)."""
    for i in T.unroll(n):
        T.cuda.func_call("tvm_flash_pin", buf[i], source_code=PIN_SRC)


def tma_tile_macro(num_panels):
    """A macro ``tma_tile(tmap, off, panel, row0, h, bar)`` (non-hygienic: the kernel's ``smem``
    and ``bz``): a (rows x D) tile as ``num_panels`` 128-byte-swizzled 64-column panels at
    ``smem[off + p * panel]``, one TMA box per panel from the 4-d tensor map ``tmap`` (column p*64,
    row row0, head h, batch bz), completing on the mbarrier at ``smem[bar]`` by bytes."""
    tma_copy = T.ptx["cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"]

    @body_macro
    def tma_tile(tmap, off, panel, row0, h, bar):
        for p in T.unroll(num_panels):
            tma_copy(T.cuda.cvta_generic_to_shared(T.address_of(smem[off + p * panel])), T.address_of(tmap),
                     p * 64, row0, h, bz, T.cuda.cvta_generic_to_shared(T.address_of(smem[bar])))

    return tma_tile


def tensormap_macro(head_dim, dtype):
    """A macro ``encode(tm, buf, S, H, rows)`` (non-hygienic: the kernel's batch size ``B``): the
    TMA tensor map of ``buf`` ([B, H, S, head_dim]: dims innermost first, byte strides) into the
    host-side ``tm``, boxes of 64 columns (one 128-byte-swizzled panel) x ``rows`` rows; rows
    and heads past the tensor are zero-filled by the hardware."""

    @body_macro
    def encode(tm, buf, S, H, rows):
        T.tensormap_encode_tiled(tm, buf.data, head_dim, S, H, B, T.int64(head_dim * 2), T.int64(S) * head_dim * 2,
                                 T.int64(H) * S * head_dim * 2, 64, rows, 1, 1, 1, 1, 1, 1,
                                 descriptor_dtype=dtype, rank=4, swizzle=3)

    return encode


def pack_frag_macro(pack2):
    """A macro ``pack_frag(dst, src, kn_count)``: an fp32 wgmma accumulator (m64nN layout) to
    fp16/bf16 pairs with ``pack2`` (the ``cvt.rn.<type>x2.f32`` op), which is the register-A
    fragment of a following wgmma: k16 step kn in dst[4kn:4kn+4]."""

    @T.macro
    def pack_frag(dst, src, kn_count):
        for kn in T.unroll(kn_count):
            pack2(dst[kn * 4 + 0], src[(2 * kn) * 4 + 1], src[(2 * kn) * 4 + 0])
            pack2(dst[kn * 4 + 1], src[(2 * kn) * 4 + 3], src[(2 * kn) * 4 + 2])
            pack2(dst[kn * 4 + 2], src[(2 * kn + 1) * 4 + 1], src[(2 * kn + 1) * 4 + 0])
            pack2(dst[kn * 4 + 3], src[(2 * kn + 1) * 4 + 3], src[(2 * kn + 1) * 4 + 2])

    return pack_frag
