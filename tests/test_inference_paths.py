"""The decoder's faster paths compute the same function as the plain formulas.

* the additive score in its sigmoid form (and the blocked, in-place inference path) equals
  wᵀ tanh(W_a a + W_h h) + b;
* shared memory: g state rows per image scored against one copy of the image's memory equal the
  same rows against g copies (every score function, soft and hard attention, beam search);
* the packed cross-entropy equals the one on the (B, T, V) grid, loss and gradients.
"""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_batch, tiny_model
from showattend.decoding import beam_search
from showattend.losses import masked_cross_entropy, reinforce_loss
from showattend.models import attention as A
from showattend.models.attention import SCORES, HardAttention, Memory, SoftAttention
from showattend.models.captioner import Captioner
from showattend.models.encoder import build_encoder

N_IMG, G, L, D, N, DIM = 3, 4, 10, 6, 5, 7


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(N_IMG, L, D, generator=gen), torch.randn(N_IMG * G, N, generator=gen)


def _reference_additive(score, a, h):
    """The paper's formula, written out."""
    return score.out(torch.tanh(score.proj_a(a) + score.proj_h(h).unsqueeze(1))).squeeze(-1)


@pytest.mark.parametrize("grad", [True, False])
def test_additive_score_is_the_tanh_formula(grad, monkeypatch):
    torch.manual_seed(0)
    score = A.AdditiveScore(D, N, DIM)
    a, h = _inputs()
    a_rep = a.repeat_interleave(G, 0)  # one image copy per state row
    ref = _reference_additive(score, a_rep, h)  # (N_IMG·G, L)
    monkeypatch.setattr(A, "_BLOCK", 2 * G * L * DIM)  # blocks of 2 images: 3 = 2 + 1 exercised
    with torch.set_grad_enabled(grad):
        grouped = score(score.precompute(a), h)  # g = 4 rows per image, one memory copy
        plain = score(score.precompute(a_rep), h)  # g = 1
    torch.testing.assert_close(grouped, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(plain, ref, rtol=1e-5, atol=1e-6)
    if grad:  # the parameters' gradients are those of the formula too
        w = torch.randn_like(ref)
        g_fast = torch.autograd.grad((grouped * w).sum(), list(score.parameters()))
        g_ref = torch.autograd.grad((_reference_additive(score, a_rep, h) * w).sum(),
                                    list(score.parameters()))
        for x, y in zip(g_fast, g_ref):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(SCORES))
def test_every_score_scores_grouped_rows_like_repeated_memory(name):
    torch.manual_seed(1)
    score = SCORES[name](D, N, DIM)
    a, h = _inputs(1)
    with torch.no_grad():
        grouped = score(score.precompute(a), h)
        repeated = score(score.precompute(a.repeat_interleave(G, 0)), h)
    torch.testing.assert_close(grouped, repeated, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls,mode", [(SoftAttention, "expectation")] + [
    (HardAttention, m) for m in ("expectation", "argmax", "sample", "mc")])
def test_attention_on_shared_memory_equals_repeated_memory(cls, mode):
    torch.manual_seed(2)
    kw = {"window": 3} if cls is HardAttention else {}
    att = cls(A.AdditiveScore(D, N, DIM), (2, 5), **kw)
    a, h = _inputs(2)
    noise = torch.rand(N_IMG * G)
    outs = []
    for mem in (att.precompute(a), Memory(*(x.repeat_interleave(G, 0) for x in att.precompute(a)))):
        torch.manual_seed(3)  # "mc" draws its locations
        with torch.no_grad():
            outs.append(att(mem, h, mode=mode, noise=noise))
    for x, y in zip(outs[0][:5], outs[1][:5]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,heads", [("soft", 1), ("hard", 1), ("local", 1), ("soft", 4),
                                        ("local", 4)])
def test_beam_search_with_shared_memory_equals_repeated_memory(kind, heads, monkeypatch):
    model = tiny_model(kind)
    if heads > 1:
        torch.manual_seed(0)
        model = Captioner.build(build_encoder("shapes_cnn", grid=4, channels=16, coords=True), 20,
                                attention=kind, heads=heads, attn_dim=16, embed_dim=16,
                                hidden_dim=32, dropout=0.0)
    model.eval()
    assert model.decoder.attention.shares_memory
    imgs, _ = tiny_batch(b=5)
    with torch.no_grad():
        feats = model.encode(imgs)
    shared = beam_search(model, feats, beam=3, max_len=8)
    monkeypatch.setattr(model.decoder.attention, "shares_memory", False, raising=False)
    repeated = beam_search(model, feats, beam=3, max_len=8)
    assert torch.equal(shared.tokens, repeated.tokens)
    torch.testing.assert_close(shared.scores, repeated.scores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared.alphas, repeated.alphas, rtol=1e-5, atol=1e-6)


def test_grouped_rows_must_divide_among_images():
    score = A.ScaledDotScore(D, N, DIM)
    a, h = _inputs()
    with pytest.raises(ValueError, match="do not divide"):
        score(score.precompute(a), h[:-1])


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_packed_loss_equals_the_grid_loss(kind):
    model = tiny_model(kind)
    imgs, caps = tiny_batch(b=6, t=9)
    caps[2, 3:] = 0  # a short caption: padding the packed rows leave out
    caps[2, 3] = 2
    targets = caps[:, 1:]
    noise = torch.rand(caps.shape[0], caps.shape[1] - 1)
    out = model(imgs, caps, noise=noise)
    assert out.packed_logits.shape[0] == int((targets != 0).sum())  # real positions only

    def losses(logits):
        ce = masked_cross_entropy(logits, targets)
        hl = reinforce_loss(logits, targets, out.log_probs, out.entropies, -3.0, 0.5, 0.1)
        return ce, hl.loss

    params = [p for p in model.parameters() if p.requires_grad]
    for packed, grid in zip(losses(out), losses(out.logits)):
        torch.testing.assert_close(packed, grid, rtol=1e-6, atol=1e-6)
        gp = torch.autograd.grad(packed, params, retain_graph=True, allow_unused=True)
        gg = torch.autograd.grad(grid, params, retain_graph=True, allow_unused=True)
        for x, y in zip(gp, gg):
            assert (x is None) == (y is None)
            if x is not None:
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)
