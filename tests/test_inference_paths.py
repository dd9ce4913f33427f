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
    """In float64: the point is the formula, and fp32 would only add rounding that depends on the
    host's kernels (tests/tolerances.py); the code paths are the same for both types."""
    from tolerances import assert_norm_close

    torch.manual_seed(0)
    score = A.AdditiveScore(D, N, DIM).double()
    a, h = (x.double() for x in _inputs())
    a_rep = a.repeat_interleave(G, 0)  # one image copy per state row
    ref = _reference_additive(score, a_rep, h)  # (N_IMG·G, L)
    monkeypatch.setattr(A, "_BLOCK", 2 * G * L * DIM)  # blocks of 2 images: 3 = 2 + 1 exercised
    with torch.set_grad_enabled(grad):
        grouped = score(score.precompute(a), h)  # g = 4 rows per image, one memory copy
        plain = score(score.precompute(a_rep), h)  # g = 1
    assert_norm_close(grouped, ref, 1e-10)
    assert_norm_close(plain, ref, 1e-10)
    if grad:  # the parameters' gradients are those of the formula too
        w = torch.randn_like(ref)
        g_fast = torch.autograd.grad((grouped * w).sum(), list(score.parameters()))
        g_ref = torch.autograd.grad((_reference_additive(score, a_rep, h) * w).sum(),
                                    list(score.parameters()))
        for x, y in zip(g_fast, g_ref):
            assert_norm_close(x, y, 1e-10)


@pytest.mark.parametrize("name", sorted(SCORES))
def test_every_score_scores_grouped_rows_like_repeated_memory(name):
    from tolerances import assert_close_fp32

    torch.manual_seed(1)
    score = SCORES[name](D, N, DIM)
    a, h = _inputs(1)
    with torch.no_grad():
        grouped = score(score.precompute(a), h)
        repeated = score(score.precompute(a.repeat_interleave(G, 0)), h)
    assert_close_fp32(grouped, repeated, k=D + N + DIM)  # the projections', then the score's dot


@pytest.mark.parametrize("cls,mode", [(SoftAttention, "expectation")] + [
    (HardAttention, m) for m in ("expectation", "argmax", "sample", "mc")])
def test_attention_on_shared_memory_equals_repeated_memory(cls, mode):
    from tolerances import assert_close_fp32

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
    for x, y in zip(outs[0][:5], outs[1][:5]):  # the score's dots, then the context's over L
        assert_close_fp32(x, y, k=D + N + DIM + L)  # locations: equal


@pytest.mark.parametrize("kind,heads", [("soft", 1), ("hard", 1), ("local", 1), ("soft", 4),
                                        ("local", 4)])
def test_beam_search_with_shared_memory_equals_repeated_memory(kind, heads, monkeypatch):
    from tolerances import STEP_K, assert_close_fp32

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
    assert_close_fp32(shared.scores, repeated.scores, k=8 * STEP_K)  # 8 steps
    assert_close_fp32(shared.alphas, repeated.alphas, k=8 * STEP_K)


def test_grouped_rows_must_divide_among_images():
    score = A.ScaledDotScore(D, N, DIM)
    a, h = _inputs()
    with pytest.raises(ValueError, match="do not divide"):
        score(score.precompute(a), h[:-1])


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_packed_loss_equals_the_grid_loss(kind):
    from tolerances import STEP_K, assert_close_fp32, norm_of

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
    n_pos = targets.numel()
    for packed, grid in zip(losses(out), losses(out.logits)):
        # the same logits; the losses sum log-softmaxes over V words at B·T positions
        assert_close_fp32(packed, grid, k=20 + n_pos)
        gp = torch.autograd.grad(packed, params, retain_graph=True, allow_unused=True)
        gg = torch.autograd.grad(grid, params, retain_graph=True, allow_unused=True)
        scale = norm_of(gg)  # a softmax's shift-invariant bias has a gradient of 0 ± rounding
        for x, y in zip(gp, gg):
            assert (x is None) == (y is None)
            if x is not None:  # back through the T = 8 steps
                assert_close_fp32(x, y, k=2 * 8 * STEP_K + n_pos, scale=scale)


def test_additive_score_backward_is_the_formulas():
    """The hand-written backward of the training path (one row per image) against autograd of
    the formula (float64 gradcheck), and the layer's gradients against the tanh formula's (float64
    too: the point is the formula, not fp32 rounding — tests/tolerances.py)."""
    from tolerances import assert_norm_close

    gen = torch.Generator().manual_seed(3)
    keys = torch.randn(2, L, DIM, generator=gen, dtype=torch.float64, requires_grad=True)
    q = torch.randn(2, DIM, generator=gen, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(DIM, generator=gen, dtype=torch.float64, requires_grad=True)
    b2 = torch.randn(1, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(A._AdditiveScores.apply, (keys, q, w2, b2))

    torch.manual_seed(0)
    score = A.AdditiveScore(D, N, DIM).double()
    a = torch.randn(N_IMG, L, D, dtype=torch.float64, requires_grad=True)
    h = torch.randn(N_IMG, N, dtype=torch.float64, requires_grad=True)
    w = torch.randn(N_IMG, L, dtype=torch.float64)
    inputs = [a, h, *score.parameters()]
    fast = torch.autograd.grad((score(score.precompute(a), h) * w).sum(), inputs)
    ref = torch.autograd.grad((_reference_additive(score, a, h) * w).sum(), inputs)
    for x, y in zip(fast, ref):
        assert_norm_close(x, y, 1e-10)


def test_packed_weights_multiply_like_the_plain_product():
    from showattend.models import packed

    gen = torch.Generator().manual_seed(4)
    w, b = torch.randn(24, 40, generator=gen), torch.randn(24, generator=gen)
    p = packed.pack(w, 8, b)
    if not packed._SUPPORTED:  # a torch without oneDNN: callers keep the plain product
        assert p is None
        return
    from tolerances import assert_close_fp32

    for rows in (1, 5, 8, 33):  # the rows hint is a hint: any number of rows works
        x = torch.randn(rows, 40, generator=gen)
        assert_close_fp32(p(x), torch.addmm(b, x, w.t()), k=40 + 1)  # 40 products and the bias
    assert packed.pack(w.double(), 8) is None  # fp32 only
    with torch.autocast("cpu", torch.bfloat16):
        assert packed.pack(w, 8) is None


@pytest.mark.parametrize("deep_output", [True, False])
def test_decoding_step_with_packed_weights_equals_the_layers(deep_output, monkeypatch):
    """Decoding (no autograd, inside a decoding call) runs the LSTM cell and output layers on
    packed weights; the step equals the modules' own, also after an optimiser step (fused Adam
    changes the weights in place without bumping their version counters: a pack must not
    outlive its call)."""
    from showattend.models import decoder as dec, packed
    from tolerances import STEP_K, assert_close_fp32

    model = tiny_model()
    model.decoder.deep_output = deep_output
    if not deep_output:
        model.decoder.L_o = torch.nn.Linear(32, 20)
    imgs, caps = tiny_batch(b=5)
    opt = torch.optim.Adam(model.parameters(), lr=0.5, fused=True)
    for _ in range(2):
        model.eval()
        with torch.no_grad():
            feats = model.encoder(imgs)
            mem, state = model.memory(feats), model.decoder.init_state(feats)
            prev = caps[:, 1]
            with packed.decoding(model.decoder):
                fast = model.decoder.step(mem, state, prev, "expectation")
                assert (packed.cached(model.decoder, "out", ()) is not None) == packed._SUPPORTED
            assert packed.cached(model.decoder, "out", ()) is None  # dropped with the call
            monkeypatch.setattr(dec, "_PACKED_ROWS", -1)  # the modules' own path
            plain = model.decoder.step(mem, state, prev, "expectation")
            monkeypatch.setattr(dec, "_PACKED_ROWS", 96)
        assert_close_fp32(fast.logits, plain.logits, k=STEP_K)  # one step
        assert_close_fp32(fast.state.h, plain.state.h, k=STEP_K)
        assert_close_fp32(fast.state.c, plain.state.c, k=STEP_K)
        model.train()  # an optimiser step between two decoding calls
        loss = model(imgs, caps).packed_logits.logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
