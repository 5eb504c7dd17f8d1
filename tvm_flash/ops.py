"""The torch API: input checks, the ``tvm_flash::flash_fwd`` custom op, SDPA-compatible entry.

Tensors cross into TVM through DLPack with no copy; on CUDA the kernel runs
on torch's current stream.  The custom ops (with fake implementations) make
``torch.compile`` treat the kernels as opaque nodes.  Eager calls skip their
dispatch cost (~50 us each): without autograd the forward kernel is called
directly, with autograd through ``_FlashAttention`` (a ``torch.autograd.Function``
running the same forward and backward code).  Backward (``tvm_flash::flash_bwd``:
dQ, dK, dV from the saved LSE, ``compute_backward``) runs on the CPU (LLVM) and on
CUDA (Hopper wgmma kernels for fp16/bf16 at head dims 64/128, plain FFMA kernels
otherwise).

Inputs that are not contiguous (or whose start is not 16-byte aligned) are
copied once; outputs are always new contiguous tensors.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers

import torch

from . import runtime
from .workload import Workload

try:
    from torch.utils._python_dispatch import _get_current_dispatch_mode
except ImportError:  # pragma: no cover - torch without the helper (_tracing then plays safe)
    _get_current_dispatch_mode = None

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_HEAD_DIM, MAX_HEAD_DIM = 32, 256
_INT32_MAX = 2**31 - 1
_GRID_YZ_MAX = 65535


def _check_inputs(q, k, v, scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _check_meta(q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device)
    if scale is not None and not (isinstance(scale, numbers.Real) and not isinstance(scale, bool) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")


@functools.lru_cache(maxsize=4096)
def _check_meta(q_shape, k_shape, v_shape, q_dtype, k_dtype, v_dtype, q_device, k_device, v_device) -> None:
    """The checks that depend only on shapes, dtypes and devices, cached (a call's host time
    matters at small shapes: 4.5 -> 1 us per call); raises on bad input (never cached)."""
    for name, shape, dtype, device in (("q", q_shape, q_dtype, q_device), ("k", k_shape, k_dtype, k_device),
                                       ("v", v_shape, v_dtype, v_device)):
        if len(shape) != 4:
            raise ValueError(f"{name} must have 4 dimensions [batch, heads, seq, head_dim], got shape {tuple(shape)}")
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {dtype}; supported: float32, float16, bfloat16")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"{name} is on device {device}; supported: cpu, cuda")
        numel = math.prod(shape)
        if numel == 0:
            raise ValueError(f"{name} has a zero-size dimension: shape {tuple(shape)}")
        if numel > _INT32_MAX:
            raise ValueError(f"{name} has {numel} elements; at most 2**31-1 are supported (32-bit indexing)")
    for name, dtype, device in (("k", k_dtype, k_device), ("v", v_dtype, v_device)):
        if dtype != q_dtype:
            raise TypeError(f"q, k, v must share one dtype: q is {q_dtype}, {name} is {dtype}")
        if device != q_device:
            raise ValueError(f"q, k, v must be on one device: q is on {q_device}, {name} on {device}")
    if k_shape != v_shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k_shape)} and v {tuple(v_shape)}")
    if k_shape[0] != q_shape[0]:
        raise ValueError(f"batch sizes differ: q has {q_shape[0]}, k/v have {k_shape[0]}")
    if k_shape[3] != q_shape[3]:
        raise ValueError(f"head_dim differs: q has {q_shape[3]}, k/v have {k_shape[3]}")
    hq, hkv = q_shape[1], k_shape[1]
    if q_device.type == "cuda":
        _check_cuda_grid(q_shape[0], hq)
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    d = q_shape[3]
    if not (MIN_HEAD_DIM <= d <= MAX_HEAD_DIM) or d % 8:
        raise ValueError(f"head_dim must be a multiple of 8 in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {d}")


def _check_cuda_grid(batch: int, heads: int) -> None:
    """CUDA kernels put query heads on gridDim.y and the batch on gridDim.z (at most 65535 each)."""
    for name, n in (("batch", batch), ("query heads", heads)):
        if n > _GRID_YZ_MAX:
            raise ValueError(f"{name} = {n} exceeds the CUDA grid limit of {_GRID_YZ_MAX} for tvm_flash's kernels; "
                             f"split the call along that dimension")


def _aligned(t):
    """Contiguous with a 16-byte aligned start (the kernels' vector loads need it)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _cuda_arch(device_index) -> str:
    """The arch kernels are built for: "sm_90a" on Hopper (compute capability 9.0, where the
    arch-specific wgmma instructions exist), else "sm_<major><minor>"."""
    major, minor = torch.cuda.get_device_capability(device_index)
    return "sm_90a" if (major, minor) == (9, 0) else f"sm_{major}{minor}"


def _on_device(device: torch.device):
    """The CUDA device current for a launch (kernels run on its current stream); no-op on the CPU
    and when the device is already current (the context manager costs host time on every call)."""
    if device.type != "cuda" or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


# key-length classes with a kernel of their own where the schedule has one (``short_knobs``:
# schedules/cuda_wgmma.py, head dim 64 up to 2048 keys, 128 non-causal up to 1024)
_SHORT_SEQS = (1024, 2048)
_PERSISTENT_SEQ, _SHORT_SEQ = _SHORT_SEQS


@functools.lru_cache(maxsize=None)
def _sm_count(device_index) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _seq_class(q, k) -> int:
    """A call's key-length class: the smallest of ``_SHORT_SEQS`` that holds its keys, else 0
    (any length).  On a GPU class 1024 also needs more 128-row query tiles than the GPU has SMs,
    else it is 2048: that class's kernel (hd128) is persistent, and with at most one tile per SM
    it has nothing to overlap and ran 4-6% slower than the defaults (perf-notes v16)."""
    seq_k = k.shape[2]
    if seq_k > _SHORT_SEQ:
        return 0
    if seq_k <= _PERSISTENT_SEQ and (
            not q.is_cuda or q.shape[0] * q.shape[1] * ((q.shape[2] + 127) // 128) > _sm_count(q.device.index)):
        return _PERSISTENT_SEQ
    return _SHORT_SEQ


@functools.lru_cache(maxsize=None)
def _kernel(device_type: str, device_index, workload: Workload, short: int = 0):
    """The kernel for a workload on a device (looked up once per process): an exported
    kernel loaded by ``tvm_flash.load`` when there is one, else a cached or fresh build.
    ``short`` (a key-length class of ``_SHORT_SEQS``, or 0): the schedule's ``short_knobs``
    for key lengths up to it when it has them, else the same kernel as for any length."""
    arch = _cuda_arch(device_index) if device_type == "cuda" else ""
    kernel = runtime.exported_kernel(device_type, arch, workload)
    if kernel is not None:
        return kernel
    try:
        from .build import get_kernel, make_target, schedule_module  # imports the TVM compiler
    except ImportError as err:
        raise RuntimeError(
            f"tvm_flash: no exported kernel loaded for {workload.name} on {device_type} {arch}, and building one "
            f"needs the TVM compiler, which failed to import ({err})"
        ) from err
    # built here for this machine: the host CPU's vector instructions (AVX-512 ...) on the CPU
    target = make_target("llvm", "host") if device_type == "cpu" else make_target("cuda", arch)
    if short:
        sched = schedule_module(target, workload)
        sms = _sm_count(device_index) if device_type == "cuda" else None
        knobs = getattr(sched, "short_knobs", lambda *_, **__: None)(workload.head_dim, workload.dtype, workload.causal,
                                                                     max_seq_k=short, sms=sms)
        if knobs is not None:
            return get_kernel(workload, target, knobs)
        return _kernel(device_type, device_index, workload)
    return get_kernel(workload, target)


def _forward(q, k, v, causal: bool, scale: float):
    """Run the compiled kernel: returns (out, lse float32)."""
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    out = torch.empty_like(q)  # q is contiguous here: so is out
    lse = q.new_empty(q.shape[:3], dtype=torch.float32)
    dtype = str(q.dtype).removeprefix("torch.")
    kernel = _kernel(q.device.type, q.device.index, Workload(q.shape[3], dtype, bool(causal)), _seq_class(q, k))
    with _on_device(q.device):
        kernel(q, k, v, out, lse, float(scale))
    return out, lse


@torch.library.custom_op("tvm_flash::flash_fwd", mutates_args=())
def flash_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward attention on checked inputs: returns (out, lse float32)."""
    return _forward(q, k, v, causal, scale)


@flash_fwd.register_fake
def _flash_fwd_fake(q, k, v, causal, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def _backward_kernels(device_type: str, device_index, workload: Workload, deterministic: bool = False):
    """``(flash_bwd_dkdv, flash_bwd_dq, flash_bwd_prep or None)`` for a workload on a device:
    LLVM on the CPU; on a GPU the wgmma kernels (Hopper, fp16/bf16, head dims 64/128; with a
    delta pass) or the plain FFMA ones; looked up once per process (the build cache's key costs
    ~0.1 ms of host time).  ``deterministic``: no atomic adds (bitwise-reproducible gradients;
    the wgmma backward's causal default adds dQ with atomics).  Run them with ``_backward_into``."""
    if device_type not in ("cpu", "cuda"):
        raise NotImplementedError(f"tvm_flash: no backward kernel for device type {device_type!r}")
    try:
        from .build import get_backward_kernels, make_target  # imports the TVM compiler
    except ImportError as err:
        raise RuntimeError(
            f"tvm_flash: the backward of {workload.name} is built at first use and needs the TVM compiler, "
            f"which failed to import ({err}); exported kernels serve the forward only"
        ) from err
    if device_type == "cpu":
        return get_backward_kernels(workload, make_target("llvm", "host"), deterministic)
    return get_backward_kernels(workload, make_target("cuda", _cuda_arch(device_index)), deterministic)


@torch.library.custom_op("tvm_flash::flash_bwd", mutates_args=())
def flash_bwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, grad_out: torch.Tensor,
    lse: torch.Tensor, grad_lse: torch.Tensor, causal: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dQ, dK, dV from the forward's output and LSE (``compute_backward``)."""
    return _flash_bwd(q, k, v, out, grad_out, lse, grad_lse, causal, scale)


def _flash_bwd(q, k, v, out, grad_out, lse, grad_lse, causal: bool, scale: float):
    q, k, v, out, grad_out = (_aligned(t) for t in (q, k, v, out, grad_out))
    lse, grad_lse = lse.contiguous(), grad_lse.to(torch.float32).contiguous()
    dtype = str(q.dtype).removeprefix("torch.")
    # no atomics where torch asks for determinism, or where dq_accum's buffer would not fit
    no_atomics = torch.are_deterministic_algorithms_enabled() or not _dq_acc_fits(*q.shape)
    kernels = _backward_kernels(q.device.type, q.device.index, Workload(q.shape[3], dtype, bool(causal)), no_atomics)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    with _on_device(q.device):
        _backward_into(kernels, q, k, v, out, grad_out, lse, grad_lse, dq, dk, dv, float(scale))
    return dq, dk, dv


def _dq_acc_shape(b: int, hq: int, sq: int, d: int) -> tuple:
    """Shape of ``dq_accum``'s zeroed fp32 buffer for q of shape [B, Hq, Sq, D]: one tile-major
    region of 64*D floats per 64 queries, which the second kernel converts."""
    return (b, hq, -(-sq // 64), 64 * d)


def _dq_acc_fits(b: int, hq: int, sq: int, d: int) -> bool:
    """Whether that buffer stays within the kernels' 32-bit indexing (q's own size is checked on
    entry; the buffer pads Sq to 64)."""
    return math.prod(_dq_acc_shape(b, hq, sq, d)) <= _INT32_MAX


def _backward_into(kernels, q, k, v, out, grad_out, lse, grad_lse, dq, dk, dv, scale: float):
    """Run ``_backward_kernels``' kernels (``build.BackwardKernels``) into dq, dk, dv: the delta
    pass first where there is one (its delta = rowsum(dO * O) - dLSE then takes dLSE's place),
    then dK/dV and dQ (with ``dq_accum``: dK/dV adds dQ's fp32 partial sums into a zeroed
    buffer (``_dq_acc_shape``), which the second kernel converts)."""
    dkdv, dq_fn, prep = kernels
    if prep is not None:
        delta = torch.empty_like(lse)
        prep(out, grad_out, grad_lse, delta)
        grad_lse = delta
    if kernels.dq_accum:
        dq_acc = torch.zeros(_dq_acc_shape(*q.shape), dtype=torch.float32, device=q.device)
        dkdv(q, k, v, out, grad_out, lse, grad_lse, dk, dv, dq_acc, scale)
        dq_fn(dq_acc, dq, scale)
        return
    dkdv(q, k, v, out, grad_out, lse, grad_lse, dk, dv, scale)
    dq_fn(q, k, v, out, grad_out, lse, grad_lse, dq, scale)


@flash_bwd.register_fake
def _flash_bwd_fake(q, k, v, out, grad_out, lse, grad_lse, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal, ctx.scale = causal, scale


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    if grad_lse is None:
        grad_lse = torch.zeros_like(lse)
    # create_graph=True (grad mode on inside a backward): the custom op, which has no autograd
    # formula, so a second derivative raises instead of silently dropping this term
    bwd = flash_bwd if torch.is_grad_enabled() or _tracing(q, k, v) else _flash_bwd
    dq, dk, dv = bwd(q, k, v, out, grad_out, lse, grad_lse, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None


flash_fwd.register_autograd(_backward, setup_context=_setup_context)


class _FlashAttention(torch.autograd.Function):
    """Eager autograd without the custom ops' dispatch: the same ``_forward`` / ``_backward``."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale):  # ctx-style: apply() binds no signature (~15 us)
        out, lse = _forward(q, k, v, causal, scale)
        ctx.set_materialize_grads(False)  # None stays None: _backward makes the zeros it needs
        _setup_context(ctx, (q, k, v, causal, scale), (out, lse))
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        return _backward(ctx, grad_out, grad_lse)


def _tracing(*tensors) -> bool:
    """torch.compile / export / make_fx / jit.trace at work (or a dispatch mode is active, or a
    tensor is a subclass such as DTensor): the custom ops, which they can trace or dispatch,
    rather than direct kernel calls, which they cannot."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return True
    if any(type(t) not in (torch.Tensor, torch.nn.Parameter) for t in tensors):
        return True
    if _get_current_dispatch_mode is None:  # pragma: no cover - torch without the helper: play safe
        return True
    return _get_current_dispatch_mode() is not None


def _forward_ad() -> bool:
    """A forward-mode AD level is active (``torch.autograd.forward_ad.dual_level``)."""
    return getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0


def attention(q, k, v, *, causal=False, scale=None, return_lse=False):
    """FlashAttention forward.

    q: [B, Hq, Sq, D]; k, v: [B, Hkv, Sk, D] with Hq % Hkv == 0 (GQA/MQA).
    dtype float32/float16/bfloat16 (accumulation in float32); D a multiple of
    8 in [32, 256]; any Sq, Sk >= 1.  ``causal`` is top-left aligned (query i
    sees keys j <= i); ``scale`` defaults to 1/sqrt(D).  Returns the output
    [B, Hq, Sq, D], and with ``return_lse`` also the float32 log-sum-exp
    [B, Hq, Sq] (natural log)."""
    _check_inputs(q, k, v, scale)
    if not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None:
        raise NotImplementedError(
            "tvm_flash.attention does not support torch.func transforms (vmap, grad, jacrev, ...): call it "
            "outside them (batch with the B dimension; use tensor.backward / torch.autograd.grad for gradients)"
        )
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    # The custom op costs ~50 us of dispatch per call: eager calls skip it (module docstring).
    if _tracing(q, k, v):
        out, lse = flash_fwd(q, k, v, bool(causal), scale)
    elif (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)) or _forward_ad():
        # (forward-mode AD: the Function has no jvp, so dual inputs get a clear error, not a
        # silent zero tangent)
        out, lse = _FlashAttention.apply(q, k, v, bool(causal), scale)
    else:
        out, lse = _forward(q, k, v, bool(causal), scale)
    return (out, lse) if return_lse else out


def scaled_dot_product_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` (no mask, no dropout).

    Accepts [B, H, S, D] or [B, S, D] tensors.  As in torch, differing query
    and key/value head counts need ``enable_gqa=True``."""
    if attn_mask is not None:
        raise ValueError("tvm_flash does not support attn_mask (only is_causal); use F.scaled_dot_product_attention for masks")
    if dropout_p != 0.0:
        raise ValueError(f"tvm_flash does not support dropout (dropout_p={dropout_p}); pass dropout_p=0.0")
    squeeze = all(isinstance(t, torch.Tensor) and t.dim() == 3 for t in (query, key, value))
    if squeeze:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
    if isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor) and query.dim() == key.dim() == 4:
        if query.shape[1] != key.shape[1] and not enable_gqa:
            raise ValueError(
                f"query has {query.shape[1]} heads and key {key.shape[1]}: pass enable_gqa=True for grouped-query attention"
            )
    out = attention(query, key, value, causal=is_causal, scale=scale)
    return out.squeeze(1) if squeeze else out
