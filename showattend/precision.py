"""Numeric precision of a run — "auto" | "fp32" | "bf16" — with the same meaning on CPU and CUDA.

``auto`` takes bf16 where the device multiplies bf16 matrices fast (a CUDA GPU with bf16; a CPU
with AMX or AVX512-BF16, or, where neither flag can be read, one whose bf16 matmul measured
faster than fp32 once per process) and fp32 elsewhere. An explicit ``bf16`` on a CPU without fast
bf16 still runs — slowly — after a one-line warning.

What runs in bf16 on the CPU is chosen, not blanket: ``torch.autocast("cpu")`` casts at every
small operation of the recurrence and measured slower than fp32 (0.44×). Inside a
:func:`compute` block the layers that hold the time — the annotation projection, the gate inputs
over all positions and the recurrence's per-step gate products, the deep output, the vocabulary
projection — call :func:`linear`, which multiplies bf16 copies of the inputs and of the weights
(made once per block: one optimiser step, one decoding call) and returns float32. Everything else
stays float32: the LSTM state, the softmax over cells, the losses, beam scores, and the
optimiser's weights (the checkpoint is the fp32 state dict, loadable anywhere). The CNN encoder
runs its convolutions under bf16 autocast in channels_last (:func:`encoder_context`), and its
output is returned as float32. On CUDA, ``bf16`` is plain autocast, as before.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import threading
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F

__all__ = ["PRECISIONS", "PrecisionError", "fast_bf16", "resolve", "choose", "describe",
           "compute", "active",
           "linear", "bf16_copy", "encoder_context"]

PRECISIONS = ("auto", "fp32", "bf16")

log = logging.getLogger(__name__)


class PrecisionError(ValueError):
    """An unknown precision name (one line)."""


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=1)
def _measured_cpu_bf16() -> bool:
    """bf16 vs fp32 on a 512² matmul, once per process: faster by at least 1.5×?"""
    def best(dtype: torch.dtype) -> float:
        a, b = torch.randn(512, 512).to(dtype), torch.randn(512, 512).to(dtype)
        a @ b
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        return min(times)
    return best(torch.bfloat16) * 1.5 < best(torch.float32)


@functools.lru_cache(maxsize=8)
def fast_bf16(device_type: str = "cpu", index: int = 0) -> tuple[bool, str]:
    """(has fast bf16, the reason in words) for a device type ("cpu" | "cuda")."""
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return False, "no CUDA device"
        ok = torch.cuda.is_bf16_supported()
        name = torch.cuda.get_device_name(index)
        return ok, f"{name} {'supports' if ok else 'lacks'} bf16"
    if device_type != "cpu":
        return False, f"{device_type}: bf16 not detected"
    mkldnn_bf16 = bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
    amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    avx = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
    flags = _cpu_flags()
    amx = amx or "amx_bf16" in flags
    avx = avx or "avx512_bf16" in flags
    if mkldnn_bf16 and (amx or avx):
        return True, "CPU with " + " and ".join(n for n, ok in (("AMX", amx),
                                                              ("AVX512-BF16", avx)) if ok)
    if flags or not mkldnn_bf16:  # flags read and none says bf16: no matrix unit for it
        return False, "CPU without AMX or AVX512-BF16"
    if _measured_cpu_bf16():
        return True, "CPU whose bf16 matmul measured ≥ 1.5× fp32"
    return False, "CPU whose bf16 matmul measured no faster than fp32"


def resolve(requested: str, device: torch.device, what: str = "this run", warn=None) -> str:
    """"auto" → "bf16" or "fp32" for ``device``; "bf16" where it is slow warns (one line on
    stderr, or the message through ``warn``); an unknown name raises :class:`PrecisionError`."""
    if requested not in PRECISIONS:
        raise PrecisionError(f"unknown precision {requested!r}; choose one of "
                             f"{', '.join(PRECISIONS)}")
    fast, why = fast_bf16(device.type, device.index or 0)
    if requested == "auto":
        return "bf16" if fast else "fp32"
    if requested == "bf16" and not fast:
        line = (f"precision bf16 for {what} on a {why}: it runs, but slower than fp32 "
                f"(no bf16 matrix units)")
        (warn or (lambda s: print(f"showattend: warning: {s}", file=sys.stderr)))(line)
    return requested


def choose(requested: str, device: torch.device, what: str) -> str:
    """:func:`resolve`, with the warning and the choice (``describe``) in the log."""
    chosen = resolve(requested, device, what, warn=log.warning)
    # said when there is news (auto's choice, or bf16); plain fp32, the default, stays quiet
    log.log(logging.DEBUG if requested == "fp32" else logging.INFO, "precision: %s",
            describe(requested, chosen, device))
    return chosen


def describe(requested: str, resolved: str, device: torch.device) -> str:
    """"bf16 (auto: CPU with AMX)" — what was chosen and why, for logs and metrics."""
    if requested != "auto":
        return resolved
    return f"{resolved} (auto: {fast_bf16(device.type, device.index or 0)[1]})"


# --------------------------------------------------------------------------- the bf16 block
_LOCAL = threading.local()


class _Scope:
    """bf16 copies of the weights used inside one :func:`compute` block (keyed by storage,
    shape and strides, so views of one weight get their own copy)."""

    def __init__(self) -> None:
        self.copies: dict[tuple, torch.Tensor] = {}

    def bf16(self, w: torch.Tensor) -> torch.Tensor:
        if w.dtype == torch.bfloat16:
            return w
        key = (w.data_ptr(), tuple(w.shape), tuple(w.stride()), w.device)
        c = self.copies.get(key)
        if c is None:
            c = self.copies[key] = w.detach().to(torch.bfloat16)
        return c


def active() -> _Scope | None:
    """The innermost CPU bf16 block of this thread, or None (fp32, or CUDA autocast)."""
    stack = getattr(_LOCAL, "stack", None)
    return stack[-1] if stack else None


@contextlib.contextmanager
def _cpu_scope() -> Iterator[None]:
    stack = _LOCAL.__dict__.setdefault("stack", [])
    outer = stack[-1] if stack else None
    stack.append(outer if outer is not None else _Scope())  # nested blocks share the copies
    try:
        yield
    finally:
        stack.pop()


def compute(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The block in which a forward pass (and its loss), or a decoding call, runs at
    ``precision`` (already resolved: "fp32" | "bf16"). Weights must not change inside it."""
    if precision != "bf16":
        return contextlib.nullcontext()
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return _cpu_scope()


def bf16_copy(w: torch.Tensor) -> torch.Tensor | None:
    """The block's bf16 copy of ``w`` (made once per block), or None outside a CPU bf16 block."""
    scope = active()
    return None if scope is None else scope.bf16(w)


class _Bf16Linear(torch.autograd.Function):
    """y = x Wᵀ + b with both products (and the backward's) in bf16, y and gradients float32."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                w16: torch.Tensor) -> torch.Tensor:
        x16 = x.to(torch.bfloat16)
        ctx.save_for_backward(x16, w16)
        ctx.has_bias = b is not None
        y = F.linear(x16, w16).float()  # (…, out)
        return y.add_(b) if b is not None else y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x16, w16 = ctx.saved_tensors
        need = ctx.needs_input_grad
        g16 = g.to(torch.bfloat16)
        gx = g16.matmul(w16).float() if need[0] else None  # (…, in)
        gw = None
        if need[1]:
            gw = g16.reshape(-1, g16.shape[-1]).t().mm(
                x16.reshape(-1, x16.shape[-1])).float()  # (out, in)
        gb = g.reshape(-1, g.shape[-1]).sum(0) if ctx.has_bias and need[2] else None
        return gx, gw, gb, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    """F.linear(x, weight, bias), in bf16 inside a CPU bf16 block (float32 in and out).
    ``weight``: a parameter or a view of one — its bf16 copy is kept for the block by address,
    which only a tensor alive for the whole block can own."""
    scope = active()
    if scope is None or x.dtype != torch.float32 or x.device.type != "cpu" or \
            weight.dtype != torch.float32:
        return F.linear(x, weight, bias)
    return _Bf16Linear.apply(x, weight, bias, scope.bf16(weight))


@contextlib.contextmanager
def encoder_context(module: torch.nn.Module, images: torch.Tensor) -> Iterator[torch.Tensor]:
    """Inside a CPU bf16 block: the CNN in channels_last under bf16 autocast (yields the images
    in channels_last); elsewhere a no-op yielding the images as they are."""
    if active() is None or images.device.type != "cpu" or images.dim() != 4:
        yield images
        return
    if not getattr(module, "_showattend_channels_last", False):
        # outside inference mode, so a trainable encoder's parameters stay ordinary tensors
        with torch.inference_mode(False), torch.no_grad():
            module.to(memory_format=torch.channels_last)
        module._showattend_channels_last = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yield images.contiguous(memory_format=torch.channels_last)
