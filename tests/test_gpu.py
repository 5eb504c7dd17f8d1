"""CUDA checks (skipped without a GPU): accuracy against the float64 reference
at long sequences, GQA, Sq != Sk causal, poisoned outputs, streams, CUDA graphs,
torch.compile (inductor) and reuse of the cached kernel by a new process."""

import pytest
import torch
from conftest import assert_accurate, gpu, rand_qkv
from test_build_cache import check_reuse

import tvm_flash

pytestmark = [gpu, pytest.mark.gpu]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("s", [128, 1000, 4096])
def test_accuracy_square(dtype, d, causal, s):
    q, k, v = rand_qkv(1, 2, 2, s, s, d, dtype, "cuda", seed=s + d)
    assert_accurate(q, k, v, causal)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gqa_32_q_heads_8_kv_heads(dtype):
    q, k, v = rand_qkv(2, 32, 8, 300, 300, 128, dtype, "cuda", seed=11)
    assert_accurate(q, k, v, causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sq,sk", [(1, 1), (1, 777), (777, 1), (300, 1000), (1000, 300), (129, 65)])
def test_sq_ne_sk_causal(dtype, sq, sk):
    q, k, v = rand_qkv(2, 4, 2, sq, sk, 64, dtype, "cuda", seed=sq + sk)
    assert_accurate(q, k, v, causal=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d", [32, 80, 96, 192, 256])
def test_other_head_dims(d, dtype):
    q, k, v = rand_qkv(1, 2, 1, 200, 150, d, dtype, "cuda", seed=d)
    assert_accurate(q, k, v, causal=True)


WGMMA_VARIANTS = [  # (head dim, knobs): loop variants a tuning log may pick, beside the defaults
    # (a warp-specialized variant loads by TMA unless tma=0)
    (128, {"ws": 1, "overlap": 0, "num_wg": 2, "block_n": 112, "num_stages": 2, "tma": 0}),  # cp.async loader, setmaxnreg, plain order
    (128, {"ws": 1, "overlap": 1, "num_wg": 2, "block_n": 128, "num_stages": 2}),  # FA3 order, 2 slots
    (128, {"ws": 1, "overlap": 1, "num_wg": 1, "block_n": 128, "num_stages": 3}),  # one consumer warpgroup
    (128, {"ws": 0, "overlap": 1, "num_wg": 2, "block_n": 64, "num_stages": 3, "tma": 0}),  # FA3 order, all threads load
    (64, {"ws": 1, "overlap": 0, "num_wg": 3, "block_n": 96, "num_stages": 2, "tma": 0}),  # 4 warpgroups, setmaxnreg
    (64, {"ws": 1, "overlap": 0, "num_wg": 3, "block_n": 64, "num_stages": 2, "tma": 0}),  # 4 warpgroups, no setmaxnreg
    (128, {"ws": 1, "overlap": 1, "pingpong": 1, "num_wg": 2, "block_n": 96, "num_stages": 4, "tma": 0}),  # cp.async loader, ping-pong
    (128, {"ws": 1, "overlap": 1, "pingpong": 0, "num_wg": 2, "block_n": 96, "num_stages": 4}),  # no ping-pong
    (128, {"ws": 1, "overlap": 1, "pingpong": 1, "num_wg": 2, "block_n": 128, "num_stages": 2}),  # ping-pong, 2 slots
    (64, {"ws": 1, "overlap": 1, "pingpong": 1, "num_wg": 3, "block_n": 96, "num_stages": 2, "tma": 0}),  # cp.async loader, 3-way ping-pong
    (64, {"ws": 0, "overlap": 0, "num_wg": 1, "block_n": 64, "num_stages": 2, "tma": 0}),  # all threads load (cp.async)
    (64, {"ws": 0, "overlap": 0, "num_wg": 1, "block_n": 64, "num_stages": 3, "tma": 0}),  # the same, 3 slots
    (128, {"ws": 1, "overlap": 1, "pingpong": 1, "num_wg": 2, "block_n": 128, "num_stages": 3, "tma": 1}),  # TMA loader
    (64, {"ws": 1, "overlap": 1, "pingpong": 1, "num_wg": 2, "block_n": 96, "num_stages": 2, "tma": 1}),  # TMA, 2 slots
    (256, {"ws": 1, "overlap": 1, "num_wg": 2, "block_n": 48, "num_stages": 3, "tma": 1}),  # TMA, 4 panels
    (128, {"block_n": 176, "num_stages": 2}),  # FA3's hd128 tile (196 accumulator registers of 232)
    # persistent CTAs, few enough that each walks several query tiles (ring and Q phases wrap)
    (128, {"persistent": 3}),  # the defaults: TMA, FA3 order, ping-pong
    (128, {"overlap": 0, "pingpong": 0, "block_n": 112, "num_stages": 2, "persistent": 5}),  # plain order
    (64, {"ws": 1, "overlap": 1, "pingpong": 1, "num_wg": 2, "block_n": 96, "num_stages": 2, "tma": 1, "persistent": 2}),
    (256, {"persistent": 4}),  # 4 panels, 3 slots
    # all threads compute, thread 0 loads by TMA (plain loop order)
    (64, {"num_wg": 2, "block_n": 64, "num_stages": 2, "defer_pv_wait": 1}),  # two warpgroups (hd64 defaults: one)
    (64, {"block_n": 64, "num_stages": 3}),  # 3 slots
    (64, {"block_n": 64, "defer_pv_wait": 0}),  # the short-sequence kernel
    # FA3 order without a loader warpgroup, thread 0 loads by TMA (v13: exact, slower than the defaults)
    (64, {"overlap": 1, "num_stages": 3, "tma": 1}),  # over the hd64 defaults: one warpgroup, 128-key tiles
    (64, {"overlap": 1, "num_stages": 3, "block_n": 64, "tma": 1}),
    (128, {"ws": 0, "overlap": 1, "num_wg": 2, "block_n": 64, "num_stages": 3, "tma": 1}),
    (128, {"ws": 0, "overlap": 0, "num_wg": 2, "block_n": 64, "num_stages": 2, "tma": 1}),
    # the epilogue through shared memory and TMA stores (v14, the default wherever tma is; rows
    # past Sq clipped by the hardware), and without it under the defaults' TMA loads
    (128, {"tma_store": 0}),  # the warp-specialized defaults
    (64, {"tma_store": 0}),  # the hd64 defaults: one warpgroup, thread 0 loads by TMA
    (64, {"block_n": 64, "defer_pv_wait": 0, "tma_store": 1}),  # the short-sequence kernel
    (192, {"tma_store": 1}),  # 3 panels
    (256, {"tma_store": 1}),  # 4 panels
    (128, {"ws": 0, "overlap": 0, "num_wg": 2, "block_n": 64, "num_stages": 2, "tma": 1, "tma_store": 1}),
    # persistent CTAs with TMA stores from an O tile of their own (v15)
    (128, {"persistent": 3, "tma_store": 1, "block_n": 96}),
    (128, {"overlap": 0, "pingpong": 0, "block_n": 96, "num_stages": 2, "persistent": 5, "tma_store": 1}),
    (64, {"ws": 1, "overlap": 1, "pingpong": 1, "num_wg": 2, "block_n": 96, "num_stages": 2, "tma": 1, "persistent": 2,
          "tma_store": 1}),
    # K and V with barriers of their own (kv_split, v16; with 2 slots, persistent and TMA stores: the hd128 short kernel)
    (128, {"kv_split": 1}),  # the defaults' 3 slots
    (128, {"kv_split": 1, "num_stages": 2}),  # 2 slots (fewer key tiles than slots, too)
    (128, {"kv_split": 1, "num_stages": 2, "pingpong": 0}),  # the two warpgroups drift
    (128, {"kv_split": 1, "block_n": 176, "num_stages": 2}),  # FA3's hd128 tile
    (128, {"kv_split": 1, "num_stages": 2, "persistent": 3, "tma_store": 1}),  # persistent, O tile beside the ring
    (128, {"kv_split": 1, "num_stages": 2, "persistent": 5}),  # persistent, direct stores
    (256, {"kv_split": 1}),  # 4 panels
    (64, {"ws": 1, "overlap": 1, "pingpong": 1, "num_wg": 2, "block_n": 96, "num_stages": 2, "tma": 1, "persistent": 2,
          "kv_split": 1}),
    # persistent CTAs walking the tiles query tile slowest (tile_order; not yet run on a GPU)
    (128, {"kv_split": 1, "num_stages": 2, "persistent": 3, "tma_store": 1, "tile_order": 1}),
    (128, {"persistent": 5, "tile_order": 1}),
]


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="the wgmma kernel needs a Hopper GPU (sm_90a)")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d,knobs", WGMMA_VARIANTS,
                         ids=["d%d-" % d + "-".join(f"{k}{v}" for k, v in kn.items()) for d, kn in WGMMA_VARIANTS])
def test_wgmma_variants(d, knobs, causal):
    """Every loop variant of the wgmma kernel is exact on awkward shapes: a single key, fewer
    key tiles than ring slots, tails, Sq != Sk, GQA (poisoned outputs, float64 reference)."""
    import math

    from conftest import torch_attention

    from tvm_flash.build import Workload, get_kernel, make_target
    from tvm_flash.reference import attention_ref

    kernel = get_kernel(Workload(d, "bfloat16", causal), make_target("cuda", "sm_90a"), knobs)
    for i, (b, hq, hkv, sq, sk) in enumerate([(1, 4, 2, 1, 1), (1, 2, 2, 300, 5), (1, 4, 2, 77, 1029),
                                              (1, 2, 2, 1029, 77), (2, 6, 2, 1000, 1000)]):
        q, k, v = rand_qkv(b, hq, hkv, sq, sk, d, torch.bfloat16, "cuda", seed=100 + i)
        out = torch.full_like(q, float("nan"))
        lse = torch.full(q.shape[:3], float("nan"), dtype=torch.float32, device="cuda")
        kernel(q, k, v, out, lse, 1 / math.sqrt(d))
        torch.cuda.synchronize()
        ref, ref_lse = attention_ref(q, k, v, causal=causal)
        err = (out.double().cpu() - ref).abs().max().item()  # NaN (an unwritten element) fails too
        bound = 2 * (torch_attention(q, k, v, causal).double().cpu() - ref).abs().max().item() + 1e-6
        assert err <= bound, f"{(b, hq, hkv, sq, sk)}: max abs error {err:.3e} > {bound:.3e}"
        assert (lse.double().cpu() - ref_lse).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_short_kernel_with_many_query_tiles(dtype):
    """hd128 without causal masking, <= 1024 keys and more query tiles than SMs: attention()
    takes the key-length class of the persistent short kernel (tails in Sq and Sk, GQA), which
    is exact; with few query tiles the class of the defaults."""
    from tvm_flash.ops import _seq_class

    q, k, v = rand_qkv(1, 40, 8, 1000, 777, 128, dtype, "cuda", seed=21)
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    assert _seq_class(q, k) == (1024 if 40 * 8 > sms else 2048)
    assert _seq_class(q[:, :2], k) == 2048
    assert_accurate(q, k, v, causal=False)


def test_runs_on_current_stream():
    q, k, v = rand_qkv(4, 8, 8, 1024, 1024, 64, torch.float16, "cuda", seed=12)
    expected = tvm_flash.attention(q, k, v)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = tvm_flash.attention(q, k, v)
        total = out.float().sum()  # queued behind the kernel on the same stream
    torch.cuda.synchronize()
    assert torch.equal(out, expected) and torch.isfinite(total)


@pytest.mark.parametrize("d,causal", [(64, False), (128, True)])
def test_cuda_graph_capture_and_replay(d, causal):
    """attention captured in a CUDA graph (the way to take tiny calls off the host) replays on
    new data copied into the captured inputs: the kernel (and on Hopper its TMA tensor maps,
    encoded at capture) reads the static buffers, and the output matches an eager call."""
    q, k, v = rand_qkv(2, 8, 4, 640, 640, d, torch.bfloat16, "cuda", seed=15)
    tvm_flash.attention(q, k, v, causal=causal)  # compiled / loaded outside the capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        tvm_flash.attention(q, k, v, causal=causal)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tvm_flash.attention(q, k, v, causal=causal)
    for seed in (16, 17):
        for dst, src in zip((q, k, v), rand_qkv(2, 8, 4, 640, 640, d, torch.bfloat16, "cuda", seed=seed)):
            dst.copy_(src)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, tvm_flash.attention(q, k, v, causal=causal))


def test_torch_compile_inductor():
    def block(q, k, v):
        return tvm_flash.attention(q * 2, k, v, causal=True).float().relu().sum(-1)

    q, k, v = rand_qkv(2, 4, 4, 256, 256, 64, torch.bfloat16, "cuda", seed=13)
    compiled = torch.compile(block, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), block(q, k, v), atol=1e-2, rtol=1e-2)


def test_no_device_memory_leak():
    q, k, v = rand_qkv(2, 4, 4, 512, 512, 64, torch.float16, "cuda", seed=14)
    tvm_flash.attention(q, k, v)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(100):
        tvm_flash.attention(q, k, v)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before


def test_second_process_reuses_cached_cuda_kernel(tmp_path):
    check_reuse(tmp_path, "cuda")
