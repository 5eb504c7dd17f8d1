"""Schedule helpers shared by the target schedules: the phase blocks of the generic compute
(``cpu``, ``cuda_simt``), and the pieces the hand-written CUDA kernels share (shared-memory
limit, PTX type names, the register pin after ``wgmma.wait_group``, closure-aware TVMScript
macros).  Part of every kernel's cache key (``tvm_flash.build._source_hash``)."""

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
