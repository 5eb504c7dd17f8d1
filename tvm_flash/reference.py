"""Float64 reference attention on the CPU, with tvm_flash's semantics.

Used by every test and by the demo.  Returns (out, lse) in float64:
out = softmax(scale * q kᵀ + causal mask) v, lse = logsumexp over keys
(natural log).  GQA: kv head = q head // (Hq // Hkv).  Causal is top-left
aligned (query i sees keys j <= i), as torch SDPA's ``is_causal``.
"""

import math

import torch


def attention_ref(q, k, v, *, causal=False, scale=None):
    q, k, v = (t.detach().to("cpu", torch.float64) for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    if causal:
        sq, sk = s.shape[-2:]
        keep = torch.ones(sq, sk, dtype=torch.bool).tril()
        s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    out = torch.exp(s - lse.unsqueeze(-1)) @ v
    return out, lse
