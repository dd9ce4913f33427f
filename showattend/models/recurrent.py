"""LSTM gate pre-activations whose weight gradients are computed once per batch, not per step.

Teacher forcing runs the recurrence one step at a time, and autograd then forms the gradient of
the recurrent weights once per step: an outer product over a few dozen rows (z_tᵀ g_t, a skinny
matmul the CPU runs far below its peak) plus a full-size accumulation into the weight's gradient,
for every step. Both weights' gradients are sums over steps, Σ_t z_tᵀ g_t and Σ_t h_tᵀ g_t, so
:class:`RecurrentGates` records each step's input and gate gradient on a shared tape and the first
step's backward — which autograd runs after every later step's, since all of them depend on it —
forms each sum as one large matmul over all real positions.

The per-step products themselves (a few dozen rows times the same weights, forward and backward)
use weights packed once per pass where the CPU can (packed.py).
"""

from __future__ import annotations

import torch

from showattend import precision
from showattend.models.packed import Packed, pack


class GateTape:
    """Per-step inputs and gate gradients of one teacher-forced pass, and the recurrent weights
    packed for its per-step products (None where packing does not apply)."""

    def __init__(self, w_z: torch.Tensor | None = None, w_h: torch.Tensor | None = None,
                 rows: int = 0) -> None:
        self.z: dict[int, torch.Tensor] = {}
        self.h: dict[int, torch.Tensor] = {}
        self.g: dict[int, torch.Tensor] = {}
        self.fwd: Packed | None = None  # [z, h] ↦ gates
        self.w: torch.Tensor | None = None  # (4N, D + N) the same weights, contiguous
        # inside a CPU bf16 block (precision.py): the products in bf16, gradients float32
        self.bf16 = precision.active() is not None and w_z is not None and \
            w_z.dtype == torch.float32 and w_z.device.type == "cpu"
        if w_z is not None and w_h is not None:
            w = torch.cat([w_z.detach().t(), w_h.detach().t()], 1)  # (4N, D + N)
            self.fwd = pack(w, rows, bf16=self.bf16)
            if self.bf16:
                self.w = w.to(torch.bfloat16)
            else:
                self.w = w if self.fwd is not None else None


class RecurrentGates(torch.autograd.Function):
    """gates = x + z @ w_z + h @ w_h for step ``t``; the weight gradients arrive with step 0's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, z: torch.Tensor, h: torch.Tensor, w_z: torch.Tensor,
                w_h: torch.Tensor, tape: GateTape, t: int) -> torch.Tensor:
        ctx.save_for_backward(z, h, w_z, w_h)
        ctx.tape, ctx.t = tape, t
        if tape.fwd is not None and x.dtype == torch.float32:
            return tape.fwd(torch.cat([z, h], 1)).add_(x)  # (n, 4N)
        if tape.bf16:
            return torch.cat([z, h], 1).to(torch.bfloat16).mm(tape.w.t()).float().add_(x)
        return torch.addmm(torch.addmm(x, z, w_z), h, w_h)  # (n, 4N)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        # under autocast the forward matmuls ran in g's dtype (bf16): so do their gradients
        z, h, w_z, w_h = (x.to(g.dtype) for x in ctx.saved_tensors)
        tape, t = ctx.tape, ctx.t
        need = ctx.needs_input_grad
        if tape.w is not None and (need[1] or need[2]) and g.dtype == torch.float32:
            # one product with the contiguous [W_z; W_h] (packing its transpose would cost a
            # transposing copy per pass, more than the packed product saves)
            gzh = g.to(tape.w.dtype).mm(tape.w).float() if tape.bf16 else g.mm(tape.w)
            gz, gh = gzh.split([w_z.shape[0], w_h.shape[0]], 1)  # (n, D), (n, N)
            gz, gh = (gz if need[1] else None), (gh if need[2] else None)
        else:
            gz = g.mm(w_z.t()) if need[1] else None  # (n, D)
            gh = g.mm(w_h.t()) if need[2] else None  # (n, N)
        gwz = gwh = None
        if need[3] or need[4]:
            tape.z[t], tape.h[t], tape.g[t] = z, h, g
            if t == 0:  # every later step has run its backward: sum over all positions at once
                steps = sorted(tape.g)
                grads = torch.cat([tape.g[s] for s in steps])  # (P, 4N)
                dt = torch.bfloat16 if tape.bf16 else grads.dtype
                grads = grads.to(dt)
                # formed as (4N, ·) and returned transposed: the weights are stored (4N, ·), so
                # their gradients then accumulate row by row instead of as a transposing copy
                if need[3]:
                    gwz = grads.t().mm(torch.cat([tape.z[s] for s in steps]).to(dt)).t() \
                        .to(w_z.dtype)  # (D, 4N)
                if need[4]:
                    gwh = grads.t().mm(torch.cat([tape.h[s] for s in steps]).to(dt)).t() \
                        .to(w_h.dtype)  # (N, 4N)
                tape.z.clear(), tape.h.clear(), tape.g.clear()
        return g, gz, gh, gwz, gwh, None, None
