"""Attention over the annotation grid: score functions (one registry), soft and hard attention.

A score function maps annotations a (B, L, D) and the decoder state h (B, N) to scores e (B, L).
Annotation-side projections are computed once per image (``precompute``), not once per word.

Shared memory (beam search): the state may have g rows per image, h (B·g, N) against a memory of
B images, rows image-major (image i owns rows i·g … i·g+g−1). Scores, contexts and crops are then
computed against each image's one copy of the annotations and projections — the K beams of an
image never copy them. Kinds that support this say ``shares_memory = True``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
import torch.nn.functional as F

from showattend import precision


class AdditiveScore(nn.Module):
    """The paper's MLP: e_i = wᵀ tanh(W_a a_i + W_h h) + b.

    Computed as e_i = 2 wᵀ σ(2 W_a a_i + 2 W_h h) + (b − Σ w), the same function
    (tanh u = 2σ(2u) − 1) with the same parameters: this elementwise pass over L × A values per
    word is the attention's main cost, and the CPU's sigmoid runs about three times faster than
    its tanh (bench/README.md). ``precompute`` therefore returns 2 (W_a a_i + b_a).
    """

    def __init__(self, feat_dim: int, hidden_dim: int, attn_dim: int):
        super().__init__()
        self.proj_a = nn.Linear(feat_dim, attn_dim)
        self.proj_h = nn.Linear(hidden_dim, attn_dim, bias=False)
        self.out = nn.Linear(attn_dim, 1)

    def precompute(self, a: torch.Tensor) -> torch.Tensor:
        if type(self.proj_a) is nn.Linear:  # in bf16 inside a CPU bf16 block (precision.py)
            return 2.0 * precision.linear(a, self.proj_a.weight, self.proj_a.bias)  # (B, L, A)
        return 2.0 * self.proj_a(a)  # (B, L, A): doubled, see the class docstring

    def forward(self, keys: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        q = self.proj_h(h)  # (B·g, A)
        n, n_cells, a = keys.shape
        g = _group(n, q)
        w, b = _weights(self.out)  # (1, A), (1,)
        w2, b2 = 2.0 * w.reshape(-1), b - w.sum()  # the sigmoid form's weight and bias
        if keys.device.type == "cpu" and not (torch.is_grad_enabled() and (
                keys.requires_grad or q.requires_grad or w.requires_grad)):
            return _additive_scores_inference(keys, q.view(n, g, 1, a), w2, b2)  # (B·g, L)
        if g == 1 and keys.dtype == q.dtype == w2.dtype:
            return _AdditiveScores.apply(keys, q, w2, b2)  # (B, L)
        s = torch.sigmoid(torch.add(keys.unsqueeze(1), q.view(n, g, 1, a), alpha=2.0))
        return F.linear(s, w2.unsqueeze(0), b2).view(n * g, n_cells)  # (B·g, L)


class _AdditiveScores(torch.autograd.Function):
    """e = 2wᵀσ(k + 2q) + b − Σw with a hand-written backward (training, one state row per image).

    keys (B, L, A) doubled, q (B, A), w2 = 2w (A,), b2 the folded bias (scalar tensor) → (B, L).
    Autograd of the same expression makes five passes over B × L × A values in the backward — the
    outer product ge ⊗ w, the sigmoid's derivative, q's gradient scaled by 2, its sum, w's
    gradient — plus a fresh buffer for each. Here: one pass for w's gradient, one for
    ge·σ'(u) (``sigmoid_backward`` broadcasts ge over A), one to scale it by w in place, one sum.
    The forward's sigmoid runs in place on the sum's buffer.
    """

    @staticmethod
    def forward(ctx, keys: torch.Tensor, q: torch.Tensor, w2: torch.Tensor,
                b2: torch.Tensor) -> torch.Tensor:
        s = torch.add(keys, q.unsqueeze(1), alpha=2.0).sigmoid_()  # (B, L, A)
        ctx.save_for_backward(s, w2)
        ctx.b2_shape = b2.shape
        return torch.matmul(s, w2) + b2  # (B, L)

    @staticmethod
    def backward(ctx, ge: torch.Tensor):
        s, w2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        gw2 = torch.matmul(ge.reshape(1, -1), s.view(-1, s.shape[-1])).view(-1) \
            if need[2] else None  # (A,)
        gk = gq = None
        if need[0] or need[1]:
            gk = torch.ops.aten.sigmoid_backward(ge.unsqueeze(-1), s).mul_(w2)  # (B, L, A)
            gq = gk.sum(1).mul_(2.0) if need[1] else None  # (B, A)
        gb2 = ge.sum().reshape(ctx.b2_shape) if need[3] else None
        return (gk if need[0] else None), gq, gw2, gb2


def _weights(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of a Linear layer, float even when int8 decoding quantized it."""
    w, b = layer.weight, layer.bias
    w, b = (w() if callable(w) else w), (b() if callable(b) else b)
    return (w.dequantize() if w.is_quantized else w), b


# floats per block of the inference path: 2 MB, so each block's sigmoid and sum stay in cache
_BLOCK = 1 << 19


def _additive_scores_inference(keys: torch.Tensor, q: torch.Tensor, w2: torch.Tensor,
                               b2: torch.Tensor) -> torch.Tensor:
    """2wᵀ σ(k_i + 2q) + b − Σw without autograd, one cache-sized block of images at a time.

    keys (B, L, A) (already doubled), q (B, g, 1, A) → (B·g, L). The broadcast sum over all rows
    at once is B·g·L·A floats (160 beams × 196 cells × 512 = 64 MB at COCO sizes): written, read
    by the sigmoid, written again, read by the projection — each pass a trip to memory, and each
    fresh 64 MB buffer paid for in page faults. Here one reused block is filled in place and
    reduced while it is still in cache; the arithmetic is the same.
    """
    n, n_cells, a = keys.shape
    g = q.shape[1]
    dtype = torch.result_type(keys, q)
    scores = torch.empty(n, g, n_cells, dtype=dtype, device=keys.device)
    per = max(1, _BLOCK // (g * n_cells * a))  # images per block
    buf = torch.empty(min(per, n), g, n_cells, a, dtype=dtype, device=keys.device)
    w2 = w2.to(dtype)
    for i in range(0, n, per):
        j = min(n, i + per)
        blk = buf[: j - i]
        torch.add(keys[i:j].unsqueeze(1), q[i:j], alpha=2.0, out=blk).sigmoid_()  # (m, g, L, A)
        torch.mv(blk.view(-1, a), w2, out=scores[i:j].view(-1))
    return scores.view(n * g, n_cells) + b2.to(dtype)


def _group(n_images: int, rows: torch.Tensor) -> int:
    """Rows of state per image (1 in training and greedy decoding, the beam in beam search)."""
    g, rem = divmod(rows.shape[0], n_images) if n_images else (1, 0)
    if rem or g < 1:
        raise ValueError(f"{rows.shape[0]} state rows do not divide among {n_images} images")
    return g


class GeneralScore(nn.Module):
    """Bilinear ("general") score e_i = hᵀ W a_i."""

    def __init__(self, feat_dim: int, hidden_dim: int, attn_dim: int):
        super().__init__()
        self.W = nn.Linear(hidden_dim, feat_dim, bias=False)

    def precompute(self, a: torch.Tensor) -> torch.Tensor:
        return a  # (B, L, D)

    def forward(self, keys: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return _grouped_dot(keys, self.W(h))  # (B·g, L)


def _grouped_dot(keys: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """k_i · q for every row: keys (B, L, A), q (B·g, A) → (B·g, L), one bmm with g columns."""
    n, n_cells, a = keys.shape
    g = _group(n, q)
    e = torch.bmm(keys, q.view(n, g, a).transpose(1, 2))  # (B, L, g)
    return e.transpose(1, 2).reshape(n * g, n_cells)


class ScaledDotScore(nn.Module):
    """Scaled dot product of projections: e_i = (W_q h)·(W_k a_i) / √A."""

    def __init__(self, feat_dim: int, hidden_dim: int, attn_dim: int):
        super().__init__()
        self.q = nn.Linear(hidden_dim, attn_dim, bias=False)
        self.k = nn.Linear(feat_dim, attn_dim, bias=False)
        self.scale = 1.0 / math.sqrt(attn_dim)

    def precompute(self, a: torch.Tensor) -> torch.Tensor:
        return self.k(a)  # (B, L, A)

    def forward(self, keys: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return _grouped_dot(keys, self.q(h)) * self.scale  # (B·g, L)


class CosineScore(nn.Module):
    """Cosine similarity of projections times a learned temperature (bounded scores)."""

    def __init__(self, feat_dim: int, hidden_dim: int, attn_dim: int):
        super().__init__()
        self.q = nn.Linear(hidden_dim, attn_dim, bias=False)
        self.k = nn.Linear(feat_dim, attn_dim, bias=False)
        self.log_temp = nn.Parameter(torch.tensor(math.log(10.0)))

    def precompute(self, a: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.k(a), dim=-1)  # (B, L, A)

    def forward(self, keys: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        q = F.normalize(self.q(h), dim=-1)  # (B, A)
        return _grouped_dot(keys, q) * self.log_temp.exp()  # (B·g, L)


SCORES: dict[str, type[nn.Module]] = {
    "additive": AdditiveScore,
    "general": GeneralScore,
    "scaled_dot": ScaledDotScore,
    "cosine": CosineScore,
}


def build_score(name: str, feat_dim: int, hidden_dim: int, attn_dim: int) -> nn.Module:
    """Score function by registry name."""
    if name not in SCORES:
        raise ValueError(f"unknown attention score {name!r}; choose one of {', '.join(SCORES)}")
    return SCORES[name](feat_dim, hidden_dim, attn_dim)


class Memory(NamedTuple):
    """Per-image tensors computed once before decoding."""

    feats: torch.Tensor  # (B, L, D) annotations (soft context source)
    keys: torch.Tensor  # (B, L, A) score-function projections
    crops: torch.Tensor  # (B, L, D) hard: mean of the k×k window around each cell (== feats for k=1)


def repeat_rows(t: tuple, k: int) -> tuple:
    """Each tensor of a NamedTuple (memory, state) with its rows repeated k times, image-major."""
    if k == 1:
        return t
    return type(t)(*(x.repeat_interleave(k, 0) if isinstance(x, torch.Tensor) else x for x in t))


class AttentionOutput(NamedTuple):
    context: torch.Tensor  # (B, D)
    alpha: torch.Tensor  # (B, L) attention distribution
    log_prob: torch.Tensor  # (B,) log α at the sampled location (zeros for soft / expectation)
    entropy: torch.Tensor  # (B,) entropy of α in nats
    location: torch.Tensor  # (B,) chosen cell (argmax for soft / expectation)
    # Extra per-step tensors (B, ...) that decoding carries along with α (kinds.py variants):
    # "heads" (B, H, L) one map per head, "window" (B, 4) the looked-at box (x0, y0, x1, y1) as
    # fractions of the image. None for soft and hard attention.
    aux: dict[str, torch.Tensor] | None = None


def _entropy(alpha: torch.Tensor) -> torch.Tensor:
    return -(alpha * alpha.clamp_min(1e-12).log()).sum(-1)  # (B,)


def _grouped_context(alpha: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Σ_i α_i v_i per row: alpha (B·g, L), values (B, L, D) → (B·g, D), one bmm of g rows."""
    n, n_cells, d = values.shape
    g = _group(n, alpha)
    return torch.bmm(alpha.view(n, g, n_cells), values).view(n * g, d)


class SoftAttention(nn.Module):
    """Deterministic soft attention: z = Σ_i α_i a_i.

    At decoding only, ``mode`` "argmax" / "sample" / "mc" replace the weighted mean by the
    annotation of the chosen cell (the most attended, one drawn from α, the mean of 8 drawn):
    how far the soft model is from a hard one reading the same α."""

    kind = "soft"
    test_modes = ("expectation", "argmax", "sample", "mc")  # what ``mode`` changes at decoding
    stochastic = False  # trained by backpropagation alone (no sampled locations)
    needs_pixels = False  # attends to annotations only (glimpses read the image itself)
    shares_memory = True  # g state rows per image (beam search) against one memory per image

    def __init__(self, score: nn.Module, grid: tuple[int, int]):
        super().__init__()
        self.score = score
        self.grid = grid

    def precompute(self, feats: torch.Tensor) -> Memory:
        return Memory(feats, self.score.precompute(feats), feats)

    def forward(self, mem: Memory, h: torch.Tensor, mode: str = "expectation",
                mix: torch.Tensor | None = None, noise: torch.Tensor | None = None
                ) -> AttentionOutput:
        alpha = torch.softmax(self.score(mem.keys, h), dim=-1)  # (B·g, L)
        zeros = alpha.new_zeros(alpha.shape[0])
        if mode in ("expectation", "") or mode is None:
            context = _grouped_context(alpha, mem.feats)  # (B·g, D)
            return AttentionOutput(context, alpha, zeros, _entropy(alpha), alpha.argmax(-1))
        # A probe, never training: decode with one chosen cell's annotation instead of the
        # weighted mean, as a hard model with window 1 would from the same α.
        img = torch.arange(len(alpha), device=alpha.device) // _group(len(mem.feats), alpha)
        if mode == "mc":
            locs = torch.multinomial(alpha.detach().float(), 8, replacement=True)  # (B·g, 8)
            context = mem.feats[img.unsqueeze(1), locs].mean(1)
            return AttentionOutput(context, alpha, zeros, _entropy(alpha), alpha.argmax(-1))
        loc = alpha.argmax(-1) if mode == "argmax" else inverse_cdf(alpha, noise)  # (B·g,)
        if mode not in ("argmax", "sample"):
            raise ValueError(f"unknown attention mode {mode!r}")
        return AttentionOutput(mem.feats[img, loc], alpha, zeros, _entropy(alpha), loc)


def inverse_cdf(alpha: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """One location per row drawn from α (B, L): the first cell whose CDF exceeds u · total for
    u = ``noise`` (B,) uniform in [0, 1) (drawn here when None). Scaling by the total keeps a CDF
    that ends just below 1 in float32 from sending u to the last cell; the clamp is a guard."""
    if noise is None:
        noise = torch.rand(len(alpha), device=alpha.device)  # (B,)
    cdf = alpha.detach().cumsum(-1)  # (B, L)
    u = noise.unsqueeze(1) * cdf[:, -1:]  # (B, 1)
    return (cdf <= u).sum(-1).clamp_max(alpha.shape[1] - 1)  # (B,)


class HardAttention(nn.Module):
    """Stochastic hard attention: s ~ Cat(α), context = mean of the k×k crop of the grid at s.

    The crop is zero-padded at the borders but averaged over the cells that exist
    (``count_include_pad=False``), so a border crop is not darkened by padding.
    Modes: "sample" (training / stochastic decoding), "argmax", "expectation" (Σ_s α_s crop(s)),
    "mc" (mean of ``mc_samples`` sampled crops, a Monte-Carlo estimate of the expectation).
    ``mix`` (B,) bool selects, per sample, the expected context instead of the sampled one.
    """

    kind = "hard"
    test_modes = ("expectation", "argmax", "sample", "mc")
    stochastic = True  # sampled locations: REINFORCE terms in training, a test_mode at decoding
    needs_pixels = False
    shares_memory = True

    def __init__(self, score: nn.Module, grid: tuple[int, int], window: int = 1, mc_samples: int = 8):
        super().__init__()
        if window % 2 != 1:
            raise ValueError("hard attention window must be odd")
        self.score = score
        self.grid = grid
        self.window = window
        self.mc_samples = mc_samples

    def crop_means(self, feats: torch.Tensor) -> torch.Tensor:
        """Mean annotation of the k×k window centred on every cell: (B, L, D)."""
        if self.window == 1:
            return feats
        b, l, d = feats.shape
        h, w = self.grid
        fmap = feats.transpose(1, 2).reshape(b, d, h, w)  # (B, D, H, W)
        pooled = F.avg_pool2d(fmap, self.window, stride=1, padding=self.window // 2,
                              count_include_pad=False)  # (B, D, H, W)
        return pooled.flatten(2).transpose(1, 2)  # (B, L, D)

    def precompute(self, feats: torch.Tensor) -> Memory:
        return Memory(feats, self.score.precompute(feats), self.crop_means(feats))

    def forward(self, mem: Memory, h: torch.Tensor, mode: str = "sample",
                mix: torch.Tensor | None = None, noise: torch.Tensor | None = None
                ) -> AttentionOutput:
        """``noise`` (B,) uniform draws in [0, 1) for "sample": the location is the inverse CDF of
        α at that draw, so a caller that draws the noise up front gets the same locations however
        it batches or reorders the rows (the teacher-forced fast path relies on this)."""
        logits = self.score(mem.keys, h)  # (B, L)
        alpha = torch.softmax(logits, dim=-1)  # (B, L)
        log_alpha = torch.log_softmax(logits, dim=-1)  # (B, L)
        expected = _grouped_context(alpha, mem.crops)  # (B·g, D)
        img = torch.arange(len(alpha), device=alpha.device) // _group(len(mem.crops), alpha)
        if mode == "expectation":
            loc = alpha.argmax(-1)
            return AttentionOutput(expected, alpha, alpha.new_zeros(len(alpha)), _entropy(alpha), loc)
        if mode == "argmax":
            loc = alpha.argmax(-1)  # (B,)
        elif mode == "sample":
            loc = inverse_cdf(alpha, noise)  # (B,)
        elif mode == "mc":
            locs = torch.multinomial(alpha.detach(), self.mc_samples, replacement=True)  # (B, S)
            context = mem.crops[img.unsqueeze(1), locs].mean(1)  # (B·g, S, D) → (B·g, D)
            zeros = alpha.new_zeros(len(alpha))
            return AttentionOutput(context, alpha, zeros, _entropy(alpha), alpha.argmax(-1))
        else:
            raise ValueError(f"unknown hard attention mode {mode!r}")
        # The sampled crop is a constant w.r.t. α: gradient reaches the attention parameters only
        # through log p(s) in the score-function term (and through `expected` where mixed).
        context = mem.crops[img, loc]  # (B·g, D)
        log_prob = log_alpha.gather(1, loc.unsqueeze(1)).squeeze(1)  # (B,)
        if mix is not None:
            m = mix.to(context.dtype).unsqueeze(1)  # (B, 1)
            context = m * expected + (1 - m) * context
            log_prob = log_prob * (1 - m.squeeze(1))
        return AttentionOutput(context, alpha, log_prob, _entropy(alpha), loc)
