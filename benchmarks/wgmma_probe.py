"""Probe: one Hopper ``wgmma`` (bf16, m64nNk16, A and B from shared memory) written in TVM
TIR through the ``T.ptx`` dialect — the instruction a cuDNN/FA3-class attention kernel is
built on (issue 3's next step beyond ``mma.sync``).

One warpgroup (128 threads) loads A [64, 16] and B [N, 16] (both K-major, i.e. S = A Bᵀ as
in Q Kᵀ) into shared memory in the no-swizzle core-matrix layout (8 rows x 16 bytes per core
matrix), builds the two matrix descriptors, issues ``wgmma.fence`` / ``mma_async`` /
``commit_group`` / ``wait_group 0`` and writes the fp32 accumulators (N/2 per thread, laid
out per warp like ``mma.sync`` m16n8 tiles) to C [64, N].

    python3 benchmarks/wgmma_probe.py            # GPU: run and compare with torch (fp32)
    python3 benchmarks/wgmma_probe.py --source   # no GPU: generate CUDA, compile for sm_90a
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import tvm
from tvm.script import tirx as T

M, K = 64, 16


def wgmma_kernel(n: int = 64, swap: bool = False):
    """``swap`` exchanges the two descriptor offsets (which one the hardware reads as
    "leading" for a K-major no-swizzle layout is what the GPU run settles)."""
    N = n
    wgmma = T.ptx[f"wgmma.mma_async.sync.aligned.m64n{N}k16.f32.bf16.bf16"]
    fence = T.ptx["wgmma.fence.sync.aligned"]
    commit = T.ptx["wgmma.commit_group.sync.aligned"]
    wait = T.ptx["wgmma.wait_group.sync.aligned"]
    fence_proxy = T.ptx["fence.proxy.async.shared::cta"]
    NACC = N // 2
    # no-swizzle K-major layout: core matrix (r // 8, k // 8) of 8 x 8 elements (128 bytes)
    LBO = 128 >> 4  # next core matrix along K
    SBO = (K // 8) * 128 >> 4  # next core matrix along M (or N)
    if swap:
        LBO, SBO = SBO, LBO

    # fmt: off
    @T.prim_func
    def probe(a: T.Buffer((M, K), "bfloat16"), b: T.Buffer((N, K), "bfloat16"), c: T.Buffer((M, N), "float32")):
        T.func_attr({"global_symbol": "probe", "tirx.noalias": True})
        for bx in T.thread_binding(1, thread="blockIdx.x"):
            # one buffer with explicit offsets: TVM's shared-memory planner does not see the
            # descriptors' address_of as a use and would overlay two separate buffers
            smem = T.alloc_buffer((M * K + N * K,), "bfloat16", scope="shared.dyn", align=128)
            for tx in T.thread_binding(128, thread="threadIdx.x"):
                acc = T.alloc_buffer((NACC,), "float32", scope="local")
                desc = T.alloc_buffer((2,), "uint64", scope="local")
                for it in T.serial((M * K + 127) // 128):
                    e = it * 128 + tx
                    if e < M * K:
                        smem[((e // K) // 8 * (K // 8) + (e % K) // 8) * 64 + (e // K) % 8 * 8 + e % 8] = a[e // K, e % K]
                for it in T.serial((N * K + 127) // 128):
                    e = it * 128 + tx
                    if e < N * K:
                        smem[M * K + ((e // K) // 8 * (K // 8) + (e % K) // 8) * 64 + (e // K) % 8 * 8 + e % 8] = b[e // K, e % K]
                for i in T.serial(NACC):
                    acc[i] = T.float32(0)
                fence_proxy()  # generic-proxy smem writes -> visible to the async (tensor core) proxy
                T.tvm_storage_sync("shared")
                T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc[0]), T.address_of(smem[0]), LBO, SBO, 0)
                T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc[1]), T.address_of(smem[M * K]), LBO, SBO, 0)
                fence()
                wgmma(*[acc[i] for i in range(NACC)], desc[0], desc[1], T.bool(True), 1, 1, 0, 0)
                commit()
                wait(0)
                warp = tx // 32
                lane = tx % 32
                for j in T.serial(N // 8):
                    for h in T.serial(2):
                        for e2 in T.serial(2):
                            c[warp * 16 + lane // 4 + h * 8, j * 8 + (lane % 4) * 2 + e2] = acc[j * 4 + h * 2 + e2]
    # fmt: on
    return probe


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64, help="N of m64nNk16 (multiple of 8, <= 256)")
    ap.add_argument("--source", action="store_true", help="only generate CUDA and compile it with nvcc for sm_90a")
    args = ap.parse_args()
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90a", "max_shared_memory_per_block": 232448})
    lib = tvm.compile(tvm.IRModule({"probe": wgmma_kernel(args.n)}), target=target)
    swapped = tvm.compile(tvm.IRModule({"probe": wgmma_kernel(args.n, swap=True)}), target=target)
    if args.source:
        src = lib.mod.imports[0].inspect_source()
        with tempfile.TemporaryDirectory() as tmp:
            cu = Path(tmp) / "probe.cu"
            cu.write_text(src)
            res = subprocess.run(["nvcc", "-gencode=arch=compute_90a,code=sm_90a", "-cubin", "-o", str(Path(tmp) / "p.cubin"),
                                  str(cu)], capture_output=True, text=True)
        print("nvcc sm_90a:", "ok" if res.returncode == 0 else res.stderr[-3000:])
        print("wgmma in source:", src.count("wgmma.mma_async"))
        return res.returncode
    import torch

    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(args.n, K, device="cuda", dtype=torch.bfloat16)
    ref = a.float() @ b.float().T
    errs = []
    for name, mod in (("LBO=K-step,SBO=row-step", lib), ("swapped", swapped)):
        c = torch.full((M, args.n), float("nan"), device="cuda")
        mod["probe"](a, b, c)
        torch.cuda.synchronize()
        errs.append((c - ref).abs().max().item())
        print(f"{torch.cuda.get_device_name()} wgmma m64n{args.n}k16 bf16 ({name}): max abs error vs torch fp32 {errs[-1]:.2e}")
    return 0 if min(errs) < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
