"""Tolerances for two fp32 computations of one quantity that round differently.

A fused or packed kernel against the plain product, the sigmoid form of the additive score
against its tanh formula, a batch against one row, the fast teacher-forced path against the
stepwise one, one thread against two: each evaluates the same formula with its sums formed in
another order — and that order depends on the host's kernels (AVX2, AVX-512, AMX, oneDNN's
packed layouts) and on how the threads split the work. Their difference is rounding that no fixed
atol (1e-6, 1e-5) bounds on every host, so these tests derive theirs from the sizes involved.

The bound. A sum of k terms t_j evaluated in fp32, in any order or blocking, is off by at most
γ_k Σ|t_j|, γ_k ≈ k·eps (Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1, §4.2);
rounding errors of either sign add like a random walk, so the error is in practice about
√k·eps·Σ|t_j|, and for a dot product Σ|a_j b_j| ≤ ‖a‖‖b‖. Over a tensor of outputs whose terms
do not mostly cancel, Σ_j|t_j| is of the size of the output itself, which gives the norm-wise test

    ‖actual − expected‖₂ ≤ c · √k · eps32 · ‖expected‖₂,    eps32 = 2⁻²³ ≈ 1.19e-7,

with c = 8: two evaluations, each rounding a product, a sum and an activation per term, and
headroom for the random walk's tail. k is the length of the longest chain of roundings that
feeds one output: the longest dot product for one layer, its sum over the layers and time steps
the error passes through for a whole model (each call site states its k).

Where the terms cancel — an output that is mathematically 0 or small next to its terms (the
gradient of a softmax's shift-invariant bias, one small entry of a gradient whose terms are
large) — ‖expected‖ understates them and the caller passes ``scale``: the norm of the
uncancelled magnitudes (for a model's gradients, the norm of the whole gradient vector).

Norm-wise, not element-wise: an element-wise rtol lets a small element, which a cancelling sum
produced, fail on rounding of its large terms (the issue: 2.86e-6 off on the gradient entry
−0.164 = 2Σwσ − Σw = −9.752 + 9.588, two 120-term sums that cancel: 192 ulps of the entry, but
3 ulps of the sums).

A planted bug — a dropped factor 2, swapped gates, a wrong row or step — moves the result by a
relative 1e-3 or more, far above c·√k·eps (2.5e-6 for k = 7, 4e-5 for k = 2000), so these
tolerances still catch it. Where the point is the formula rather than the fp32 kernel, the tests
compare in float64 instead (eps64 = 2.2e-16: a relative 1e-10 leaves a million-fold margin).
"""

from __future__ import annotations

import math

import torch

EPS32 = torch.finfo(torch.float32).eps
C = 8.0

# The dot products one decoding step of the tests' tiny captioners (conftest.tiny_model and its
# kin: embedding 16, state 32, attention 16, 4×4 cells of 16 + 2 channels, ≤ 20 words) chains,
# rounded to fp32: the LSTM's over 16 + 18 + 32 = 66 inputs, the score's over 18 and 32 then 16,
# the softmax's and the context's over 16 cells, the deep output's over 32 and 18 then 16, the
# log-softmax's over 20 words — 250 in all. T steps: k = T·STEP_K; their gradients (the same
# chain back): k = 2·T·STEP_K.
STEP_K = 250


def fp32_rtol(k: int, c: float = C) -> float:
    """The norm-wise relative tolerance c·√k·eps32 for outputs fed by k fp32 roundings."""
    return c * math.sqrt(k) * EPS32


def _tensor(x) -> torch.Tensor:
    return (x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(x)).double()


def assert_norm_close(actual, expected, rtol: float, *,
                      scale: float | torch.Tensor | None = None, msg: str = "") -> None:
    """Assert ‖actual − expected‖₂ ≤ rtol·max(‖expected‖₂, scale), compared in float64.

    actual, expected: tensors (or numbers) of one shape; scale: the uncancelled magnitude where
    ``expected`` is small by cancellation (default: ‖expected‖ alone). Non-finite entries (−inf
    scores of dead beams) and integer tensors (locations) must match exactly.
    """
    if not (torch.is_floating_point(torch.as_tensor(actual))
            or torch.is_floating_point(torch.as_tensor(expected))):  # indices: no rounding
        assert torch.equal(torch.as_tensor(actual), torch.as_tensor(expected)), msg
        return
    a, e = _tensor(actual), _tensor(expected)
    assert a.shape == e.shape, f"{msg}: shapes {tuple(a.shape)} and {tuple(e.shape)}"
    finite = torch.isfinite(e)
    assert torch.equal(torch.isfinite(a), finite) and torch.equal(a[~finite], e[~finite]), \
        f"{msg}: non-finite entries differ"
    a, e = a[finite], e[finite]
    ref = float(e.norm())
    if scale is not None:
        ref = max(ref, float(_tensor(scale)))
    err, bound = float((a - e).norm()), rtol * ref
    worst = float((a - e).abs().max()) if a.numel() else 0.0
    assert err <= bound, (f"{msg}{': ' if msg else ''}‖actual − expected‖ = {err:.3g} > "
                          f"{bound:.3g} = {rtol:.3g}·{ref:.3g} (largest difference {worst:.3g})")


def assert_close_fp32(actual, expected, k: int, *, scale: float | torch.Tensor | None = None,
                      c: float = C, msg: str = "") -> None:
    """Assert ‖actual − expected‖₂ ≤ c·√k·eps32·max(‖expected‖₂, scale) (the module docstring).

    k: the number of fp32 roundings that feed one output; the rest as ``assert_norm_close``.
    """
    assert_norm_close(actual, expected, fp32_rtol(k, c), scale=scale,
                      msg=f"{msg}{' ' if msg else ''}(k = {k})")


def norm_of(tensors) -> float:
    """‖·‖₂ of several tensors taken as one vector (a model's whole gradient: ``scale``)."""
    return math.sqrt(sum(float(_tensor(t).pow(2).sum()) for t in tensors if t is not None))
