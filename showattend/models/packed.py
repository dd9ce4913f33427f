"""Weights pre-packed for the many skinny matmuls of a recurrence on the CPU (oneDNN).

A decoder step multiplies a few dozen rows (the batch, or a few beams) by the same weight matrix,
step after step. The CPU's default GEMM re-packs the weight into its blocked layout on every call,
which for 5–32 rows costs as much as the arithmetic: (32 × 2048)·(2048 × 2048) runs at ~60 % of
the 2048² rate, (5 × 2560)·(2560 × 2048) at ~15 %. oneDNN can pack a weight once and reuse it:
1.3× faster at 32 rows, 3× at 5 (bench/README.md). Packing costs about one pass over the weight,
so it pays from the second product on: a teacher-forced pass packs once per optimiser step, a
beam search once per call.

Used where it helps and exists (fp32 CPU tensors in a torch built with oneDNN); everywhere else
:func:`pack` returns None and callers keep their plain ``addmm``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn


def _supported() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available()) and hasattr(
            torch.ops.mkldnn, "_linear_pointwise") and hasattr(
            torch.ops.mkldnn, "_reorder_linear_weight")
    except (AttributeError, RuntimeError):
        return False


_SUPPORTED = _supported()
_SUPPORTED_BF16 = _SUPPORTED and bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported",
                                              lambda: False)())


class Packed:
    """x ↦ x @ Wᵀ for a fixed W (out, in), packed once. No autograd: for use inside custom
    Functions and under ``torch.no_grad``."""

    def __init__(self, weight: torch.Tensor, rows: int | None,
                 bias: torch.Tensor | None = None):
        self._w = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), rows)
        self._b = None if bias is None else bias.detach().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (n, in) → x Wᵀ + b (n, out)."""
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self._w, self._b, "none", [],
                                                  "")


class PlainBf16:
    """x ↦ x Wᵀ + b in bf16 (precision.py): x and W rounded to bf16, a plain product (bf16
    emulated where the CPU has no bf16 units), float32 out, the float32 bias added there."""

    bf16 = True

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self._w = self._prepare(weight.detach().to(torch.bfloat16))
        self._b = None if bias is None else bias.detach().float().contiguous()

    def _prepare(self, w16: torch.Tensor) -> torch.Tensor:
        return w16.t().contiguous()  # (in, out)

    def _product(self, x16: torch.Tensor) -> torch.Tensor:
        return x16.mm(self._w)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self._product(x.to(torch.bfloat16).contiguous()).float()
        return y.add_(self._b) if self._b is not None else y


class PackedBf16(PlainBf16):
    """The same arithmetic with W packed in bf16 by oneDNN for about ``rows`` rows."""

    def __init__(self, weight: torch.Tensor, rows: int | None,
                 bias: torch.Tensor | None = None):
        self._rows = rows
        super().__init__(weight, bias)

    def _prepare(self, w16: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(w16.contiguous(), self._rows)

    def _product(self, x16: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x16, self._w, None, "none", [], "")


def pack(weight: torch.Tensor, rows: int | None, bias: torch.Tensor | None = None,
         bf16: bool = False) -> Packed | PlainBf16 | None:
    """``weight`` (out, in) (and ``bias`` (out,)) packed for products with about ``rows`` rows
    (None: any), in bf16 if ``bf16``; or None where packing does not apply (not an fp32 CPU
    tensor, torch without oneDNN (or its bf16), an autocast region)."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or \
            torch.is_autocast_enabled("cpu"):
        return None
    if bf16 and not _SUPPORTED_BF16:  # bf16 asked where oneDNN has none: same numbers, slowly
        return PlainBf16(weight, bias)
    if not _SUPPORTED:
        return None
    try:
        return (PackedBf16 if bf16 else Packed)(weight, rows if rows is None else max(1, rows),
                                                bias)
    except RuntimeError:  # a oneDNN build that cannot pack this shape: the plain path works
        return None


# Packed copies of a module's weights live for one decoding call (``decoding``): the weights cannot
# change inside it, and outside it nothing can go stale — an optimiser step, a loaded checkpoint
# or fused Adam (which updates weights in place without bumping their version counters) always
# meets a fresh pack. Per thread, so that concurrent decodes of one model do not share a scope.
_LOCAL = threading.local()


@contextmanager
def decoding(owner: nn.Module) -> Iterator[None]:
    """Within the block, :func:`cached` packs ``owner``'s weights once and reuses them; nested
    blocks for the same owner share the outer one's packs."""
    tables = _LOCAL.__dict__.setdefault("tables", {})
    outer = id(owner) in tables
    if not outer:
        tables[id(owner)] = {}
    try:
        yield
    finally:
        if not outer:
            del tables[id(owner)]


def cached(owner: nn.Module, name: str, weights: Sequence[torch.Tensor],
           bias: Sequence[torch.Tensor] = (), bf16: bool = False) -> Packed | None:
    """[W_1 | W_2 | …] (concatenated along their inputs) with bias Σ b_j, packed once per
    :func:`decoding` block of ``owner`` (in bf16 if ``bf16``); None outside one or where packing
    does not apply."""
    table = getattr(_LOCAL, "tables", {}).get(id(owner))
    if table is None:
        return None
    name = f"{name}:bf16" if bf16 else name
    if name not in table:
        with torch.no_grad():
            w = weights[0] if len(weights) == 1 else torch.cat(list(weights), 1)  # (out, Σ in)
            b = sum(bias[1:], bias[0]) if bias else None  # (out,)
            table[name] = pack(w, None, b, bf16=bf16)
    return table[name]
