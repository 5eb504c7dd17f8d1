"""Schedule helpers shared by the target schedules: the phase blocks of the compute."""

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
