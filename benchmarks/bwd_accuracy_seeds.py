"""Backward accuracy of tvm_flash beside SDPA's flash, cuDNN and default backends over 3 seeds x
4 heads at four hd128 shapes: per gradient (dQ, dK, dV) the max and the mean abs error against
SDPA's math backend in float64 (on the GPU).  Made to tell whether a ~2x max-abs
ratio in the backward sweep is systematic or one low-precision ulp at one element.

    python3 benchmarks/bwd_accuracy_seeds.py     (log: benchmarks/logs/backward_accuracy_seeds_h200.txt)
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tvm_flash  # noqa: E402

def grads(fn, q, k, v, dout):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    fn(q, k, v).backward(dout)
    return q.grad, k.grad, v.grad

def sd(be, causal):
    def f(q, k, v):
        if be is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        with sdpa_kernel(be):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return f

POINTS = [("bf16", 32, 16, 512, 128, False), ("fp16", 2, 16, 8192, 128, False), ("bf16", 8, 16, 2048, 128, False),
          ("fp16", 4, 16, 4096, 128, True)]
DT = {"bf16": torch.bfloat16, "fp16": torch.float16}
print(torch.cuda.get_device_name())
for dn, b, h, s, d, causal in POINTS:
    impls = {"tvm_flash": lambda q, k, v: tvm_flash.attention(q, k, v, causal=causal),
             "flash": sd(SDPBackend.FLASH_ATTENTION, causal), "cudnn": sd(SDPBackend.CUDNN_ATTENTION, causal),
             "default": sd(None, causal)}
    acc = {n: [[0.0] * 3, [0.0] * 3, 0] for n in impls}  # max, sum of mean abs, count
    for seed in range(3):
        torch.manual_seed(1000 + seed)
        q, k, v, dout = (torch.randn(b, h, s, d, device="cuda", dtype=DT[dn]) for _ in range(4))
        gs = {n: grads(fn, q, k, v, dout) for n, fn in impls.items()}
        for hi in range(0, h, 4):
            sl = (slice(b - 1, b) if seed % 2 else slice(0, 1), slice(hi, hi + 1))
            ref = grads(sd(None, causal), *(t[sl].double() for t in (q, k, v, dout)))
            for n, g in gs.items():
                for i in range(3):
                    e = (g[i][sl].double() - ref[i]).abs()
                    acc[n][0][i] = max(acc[n][0][i], e.max().item())
                    acc[n][1][i] += e.mean().item()
                acc[n][2] += 1
        del gs
    print(f"{dn} B{b} H{h} S{s} D{d} causal={causal}: 3 seeds x {h // 4} heads")
    for n, (mx, sm, c) in acc.items():
        print(f"  {n:10s} max dQ dK dV " + " ".join(f"{x:.2e}" for x in mx) + "   mean " + " ".join(f"{x / c:.2e}" for x in sm))
