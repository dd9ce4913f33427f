"""Hard attention: crops, modes, and the REINFORCE score-function estimator."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_batch, tiny_model
from showattend.decoding import beam_search, greedy
from showattend.losses import reinforce_loss
from showattend.models.attention import AdditiveScore, HardAttention, Memory


def _hard(window: int, grid=(3, 4), d: int = 2):
    torch.manual_seed(0)
    att = HardAttention(AdditiveScore(d, 5, 4), grid, window=window, mc_samples=4000)
    feats = torch.arange(grid[0] * grid[1] * d, dtype=torch.float).reshape(1, -1, d)  # (1, L, D)
    return att, feats


def test_crop_k3_at_border_averages_existing_cells_only():
    att, feats = _hard(3)
    crops = att.crop_means(feats)  # (1, 12, 2)
    grid = feats.reshape(3, 4, 2)
    torch.testing.assert_close(crops[0, 0], grid[:2, :2].reshape(-1, 2).mean(0))  # corner: 4 cells
    torch.testing.assert_close(crops[0, 5], grid[0:3, 0:3].reshape(-1, 2).mean(0))  # interior: 9
    torch.testing.assert_close(crops[0, 7], grid[0:3, 2:4].reshape(-1, 2).mean(0))  # right edge: 6
    att1, feats1 = _hard(1)
    assert torch.equal(att1.crop_means(feats1), feats1)


@pytest.mark.parametrize("window", [1, 3])
def test_modes(window):
    from tolerances import assert_close_fp32

    att, feats = _hard(window)
    mem = att.precompute(feats)
    h = torch.randn(1, 5)
    arg = att(mem, h, mode="argmax")
    assert int(arg.location) == int(arg.alpha.argmax())
    torch.testing.assert_close(arg.context, mem.crops[0, arg.location])
    torch.testing.assert_close(arg.log_prob, arg.alpha[0, arg.location].log())
    exp = att(mem, h, mode="expectation")
    assert_close_fp32(exp.context, exp.alpha @ mem.crops[0], k=12)  # a dot over the 12 cells
    mc = att(mem, h, mode="mc")  # 4000 samples: close to the expectation
    torch.testing.assert_close(mc.context, exp.context, atol=0.35, rtol=0.05)
    torch.manual_seed(1)
    locs = torch.stack([att(mem, h, mode="sample").location for _ in range(3000)])
    freq = torch.bincount(locs.flatten(), minlength=12).float() / 3000
    torch.testing.assert_close(freq, arg.alpha[0], atol=0.03, rtol=0)


def test_per_sample_mixing_uses_expected_context_and_zero_logprob():
    att, feats = _hard(1)
    feats = feats.expand(4, -1, -1)
    mem = att.precompute(feats)
    h = torch.randn(4, 5)
    mix = torch.tensor([True, False, True, False])
    out = att(mem, h, mode="sample", mix=mix)
    exp = att(mem, h, mode="expectation")
    torch.testing.assert_close(out.context[mix], exp.context[mix])
    assert (out.log_prob[mix] == 0).all() and (out.log_prob[~mix] < 0).all()


def _toy(n_loc=5, vocab=4, seed=0):
    """An enumerable problem: α = softmax(θ) over n_loc cells; log p(y|s) = log_softmax(W[s])[y]."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(n_loc, generator=g, requires_grad=True)
    W = torch.randn(n_loc, vocab, generator=g, requires_grad=True)
    return theta, W, 2  # target word y = 2


def _estimate(theta, W, y, samples, baseline):
    """Gradient of the negated surrogate loss for a batch of sampled locations (one word each)."""
    log_alpha = torch.log_softmax(theta, 0)
    logits = W[samples].unsqueeze(1)  # (N, 1, V)
    targets = torch.full((len(samples), 1), y)
    hl = reinforce_loss(logits, targets, log_alpha[samples].unsqueeze(1),
                        torch.zeros(len(samples), 1), baseline, lambda_r=1.0, lambda_e=0.0)
    gt, gw = torch.autograd.grad(-hl.loss, [theta, W])
    return gt, gw


def test_score_function_estimator_is_unbiased():
    """reinforce_loss's gradient averages to ∇ E_s[log p(y|s)], with and without a baseline.
    (That the baseline reduces its variance is tested through reinforce_loss and train_step in
    test_reinforce.py: unbiasedness cannot tell a baseline from none.)"""
    theta, W, y = _toy()
    alpha = torch.softmax(theta, 0)
    logp_y = torch.log_softmax(W, 1)[:, y]  # (n_loc,) reward of each location
    exact = torch.autograd.grad((alpha * logp_y).sum(), [theta, W])  # ∇ E_s[log p(y|s)]
    torch.manual_seed(0)
    n = 200_000
    samples = torch.multinomial(alpha.detach(), n, replacement=True)
    mean_reward = float((alpha * logp_y).sum())
    for b in (0.0, mean_reward):
        gt, gw = _estimate(theta, W, y, samples, b)
        # Monte-Carlo standard error at n=2e5 is ~3e-3 here; tolerance 1e-2
        torch.testing.assert_close(gt, exact[0], atol=1e-2, rtol=0)
        torch.testing.assert_close(gw, exact[1], atol=1e-2, rtol=0)


def test_without_mixing_attention_learns_only_through_score_function():
    model = tiny_model("hard")
    imgs, caps = tiny_batch()
    attn_params = dict(model.decoder.attention.named_parameters())

    def grads(lambda_r):
        model.zero_grad()
        torch.manual_seed(3)
        out = model(imgs, caps, mode="sample")
        hl = reinforce_loss(out.logits, caps[:, 1:], out.log_probs, out.entropies, baseline=-10.0,
                            lambda_r=lambda_r, lambda_e=0.0)
        hl.loss.backward()
        return {n: (p.grad.abs().sum() if p.grad is not None else torch.tensor(0.0))
                for n, p in attn_params.items()}

    assert all(float(v) == 0 for v in grads(0.0).values())  # CE alone: no gradient to attention
    with_sf = grads(1.0)
    assert float(with_sf["score.out.weight"]) > 0 and float(with_sf["score.proj_h.weight"]) > 0


@pytest.mark.parametrize("mode", ["expectation", "argmax", "sample", "mc"])
def test_beam_search_works_in_every_mode(mode):
    model = tiny_model("hard", window=3).eval()
    model.test_mode = mode
    imgs, _ = tiny_batch(b=3)
    feats = model.encode(imgs)
    torch.manual_seed(0)
    out = beam_search(model, feats, beam=3, max_len=8)
    assert out.tokens.shape[0] == 3 and (out.lengths <= 8).all()
    for i in range(3):  # a map for every word and for <end>
        sums = out.alphas[i, : int(out.lengths[i]) + 1].sum(-1)
        torch.testing.assert_close(sums, torch.ones_like(sums))
    if mode in ("argmax", "expectation"):
        assert torch.equal(greedy(model, feats, 8).tokens, beam_search(model, feats, 1, 8).tokens)


def test_train_step_without_mixing_gives_attention_gradient_only_via_score_function():
    """Through the real training step (doubly stochastic penalty on, mixing off)."""
    from showattend.config import Config, replace
    from showattend.train import TrainState, train_step

    model = tiny_model("hard")
    imgs, caps = tiny_batch()
    attn = [p for p in model.decoder.attention.parameters()]
    for lambda_r, expect_grad in ((0.0, False), (0.01, True)):
        cfg = replace(Config(), hard={"mix_mode": "off", "lambda_r": lambda_r, "lambda_e": 0.0},
                      train={"alpha_c": 1.0})
        model.zero_grad()
        torch.manual_seed(0)
        loss, rec = train_step(model, imgs, caps, cfg, TrainState(baseline=-5.0))
        loss.backward()
        total = sum(float(p.grad.abs().sum()) for p in attn if p.grad is not None)
        assert (total > 0) == expect_grad, (lambda_r, total)
        assert rec["soft_batch"] == 0.0


def test_baseline_ignores_non_finite_rewards():
    from showattend.config import Config, replace
    from showattend.train import TrainState, train_step

    model = tiny_model("hard")
    imgs, caps = tiny_batch()
    cfg = replace(Config(), hard={"mix_mode": "off"})
    state = TrainState(baseline=-3.0)
    with torch.no_grad():
        model.decoder.L_o.bias.fill_(float("nan"))
    train_step(model, imgs, caps, cfg, state)
    assert state.baseline == -3.0
