"""The score-function estimators of hard attention beyond the moving-average baseline: several
location samples per caption with a leave-one-out baseline, the per-word reward (the words still
to come), the box term on the location distribution, and the soft model decoded with a chosen
cell ("--mode argmax" on soft attention).

Unbiasedness is checked exactly, by enumerating every location of small problems, so each bug
these tests were written against shows as a wrong expectation, not as noise: a baseline that
includes its own sample (half the gradient), a per-word reward that drops the current word (no
gradient for the last location) or counts earlier words, rows of a caption's samples not
adjacent, supervision applied after sampling (no gradient reaches α).
"""

from __future__ import annotations

import itertools
import logging

import pytest
import torch

import showattend.train as T
import showattend.train.objectives.hard as H
from conftest import tiny_batch, tiny_model
from showattend.config import Config, ConfigError, replace, validate
from showattend.decoding import greedy
from showattend.losses import leave_one_out, location_rewards, reinforce_loss
from showattend.train.objectives.box_supervision import BoxSupervision
from tolerances import assert_close_fp32


def test_leave_one_out_is_the_mean_of_the_other_samples():
    r = torch.tensor([1.0, 2.0, 6.0, -1.0, -3.0, -5.0])  # two captions × 3 samples
    b = leave_one_out(r, 3)
    assert_close_fp32(b, torch.tensor([4.0, 3.5, 1.5, -4.0, -3.0, -2.0]), k=3)
    r2 = r.clone()
    r2[0] = 100.0  # a sample's own reward never enters its baseline
    assert float(leave_one_out(r2, 3)[0]) == float(b[0])
    per_word = torch.tensor([[1.0, 0.5], [3.0, 1.5]])  # (2 samples of one caption, T = 2)
    assert_close_fp32(leave_one_out(per_word, 2), per_word.flip(0), k=1)
    with pytest.raises(ValueError):
        leave_one_out(r, 1)


def test_reward_to_go_counts_the_current_word_and_the_later_ones_only():
    nll = torch.tensor([[1.0, 2.0, 4.0, 9.0], [0.5, 0.25, 7.0, 7.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    R = location_rewards(nll, mask, "to_go")
    assert_close_fp32(R, -torch.tensor([[7.0, 6.0, 4.0, 0.0], [0.75, 0.25, 0.0, 0.0]]), k=4)
    assert_close_fp32(location_rewards(nll, mask, "caption"), -torch.tensor([7.0, 0.75]), k=4)


def _enumerated(n_loc: int = 4, vocab: int = 3, steps: int = 2, seed: int = 0):
    """α_t = softmax(θ_t) over n_loc cells per step; word t's log p = log_softmax(W_t[s_t])[y_t]:
    location t affects word t only, so every estimator below has a known expectation."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(steps, n_loc, generator=g, requires_grad=True)
    W = torch.randn(steps, n_loc, vocab, generator=g)
    y = 1 + torch.arange(steps) % (vocab - 1)  # word ids ≥ 1: 0 is <pad>, masked
    return theta, W, y


def _expected_gradient(theta, W, y, n: int, reward_kind: str, baseline):
    """E over every draw of n samples (each a location per step) of ∇θ reinforce_loss."""
    steps, n_loc = theta.shape
    alpha = torch.softmax(theta, 1).detach()  # (T, L)
    total = torch.zeros_like(theta)
    for draw in itertools.product(range(n_loc), repeat=steps * n):
        log_alpha = torch.log_softmax(theta, 1)  # (T, L): a graph per draw
        s = torch.tensor(draw).view(n, steps)  # (n, T) locations
        prob = float(torch.prod(alpha[torch.arange(steps).expand(n, steps), s]))
        logits = W[torch.arange(steps).expand(n, steps), s]  # (n, T, V)
        lp = log_alpha[torch.arange(steps).expand(n, steps), s]  # (n, T)
        hl = reinforce_loss(logits, y.expand(n, steps), lp, torch.zeros(n, steps), baseline,
                            1.0, 0.0, reward_kind=reward_kind)
        total += prob * torch.autograd.grad(hl.score_function, theta)[0]
    return total


def _true_gradient(theta, W, y) -> torch.Tensor:
    """−∇θ E[log p(y | s)] per token (the surrogate's units: summed, divided by the tokens)."""
    alpha = torch.softmax(theta, 1)
    r = torch.log_softmax(W, 2)[torch.arange(len(y)), :, y]  # (T, L) log p(y_t | s_t)
    expected = (alpha * r).sum()
    return -torch.autograd.grad(expected, theta)[0] / len(y)


@pytest.mark.parametrize("reward_kind", ["caption", "to_go"])
def test_leave_one_out_estimators_are_unbiased(reward_kind):
    theta, W, y = _enumerated()
    loo = H.HardAttention._leave_one_out(0, 2)  # the objective's own baseline
    got = _expected_gradient(theta, W, y, 2, reward_kind, loo)
    assert_close_fp32(got, _true_gradient(theta, W, y), k=4 ** 4 * 8)
    # a baseline that includes the sample itself (the mean of all n) halves the gradient
    own = lambda r: r.mean(0, keepdim=True).expand_as(r)  # noqa: E731
    assert (_expected_gradient(theta, W, y, 2, reward_kind, own)
            - _true_gradient(theta, W, y)).abs().max() > 0.01


def test_reward_without_the_current_word_is_biased(monkeypatch):
    """The location at step t chooses the context that predicts word t: a reward-to-go that
    starts after it gives the last location no gradient at all."""
    import showattend.losses as L

    theta, W, y = _enumerated()
    loo = H.HardAttention._leave_one_out(0, 2)
    real = L.location_rewards

    def after_current(nll, mask, kind="caption"):
        return real(nll, mask, kind) + (nll * mask).detach() if kind == "to_go" else real(
            nll, mask, kind)

    monkeypatch.setattr(L, "location_rewards", after_current)
    got = _expected_gradient(theta, W, y, 2, "to_go", loo)
    assert (got - _true_gradient(theta, W, y)).abs().max() > 0.01


def test_per_word_reward_has_lower_variance_than_the_caption_reward():
    """Exact second moments of the score-function gradient, 2 samples, leave-one-out baseline:
    the later locations no longer carry the earlier words' noise."""
    theta, W, y = _enumerated(steps=2, seed=3)
    n_loc, steps, n = theta.shape[1], 2, 2
    alpha = torch.softmax(theta, 1).detach()
    loo = H.HardAttention._leave_one_out(0, n)

    def second_moment(kind: str) -> float:
        m2, m1 = 0.0, torch.zeros_like(theta)
        for draw in itertools.product(range(n_loc), repeat=steps * n):
            log_alpha = torch.log_softmax(theta, 1)
            s = torch.tensor(draw).view(n, steps)
            idx = torch.arange(steps).expand(n, steps)
            prob = float(torch.prod(alpha[idx, s]))
            hl = reinforce_loss(W[idx, s], y.expand(n, steps), log_alpha[idx, s],
                                torch.zeros(n, steps), loo, 1.0, 0.0, reward_kind=kind)
            g = torch.autograd.grad(hl.score_function, theta)[0]
            m1 += prob * g
            m2 += prob * float((g ** 2).sum())
        return m2 - float((m1 ** 2).sum())

    assert second_moment("to_go") < second_moment("caption")


def test_loo_rows_are_the_samples_of_one_caption(monkeypatch):
    """train_step with n_samples = 3, leave-one-out: each sampled row's advantage is its reward
    minus the mean of the other two rows of the same caption, which hold the same words."""
    model = tiny_model("hard")
    imgs, caps = tiny_batch(b=5)
    cfg = replace(Config(), hard={"mix_mode": "sample", "mix_prob": 0.4, "n_samples": 3,
                                  "baseline": "loo", "lambda_e": 0.0})
    seen = {}
    real = H.reinforce_loss

    def spy(*args, **kwargs):
        hl = real(*args, **kwargs)
        seen.update(targets=args[1].clone(), hl=hl, sampled=args[7].clone())
        return hl

    monkeypatch.setattr(H, "reinforce_loss", spy)
    torch.manual_seed(4)
    for _ in range(6):
        T.train_step(model, imgs, caps, cfg, T.TrainState())
        sampled, hl, targets = seen["sampled"], seen["hl"], seen["targets"]
        n_exp = int((~sampled).sum())
        assert not bool(sampled[:n_exp].any()) and bool(sampled[n_exp:].all())
        assert (len(sampled) - n_exp) % 3 == 0
        r = hl.reward[n_exp:].view(-1, 3)
        adv = hl.advantage[n_exp:].view(-1, 3)
        want = r - (r.sum(1, keepdim=True) - r) / 2
        assert_close_fp32(adv, want, k=4, scale=r.abs().max())
        words = targets[n_exp:].view(-1, 3, targets.shape[1])
        assert bool((words == words[:, :1]).all())  # a group = one caption's samples
        assert float(hl.advantage[:n_exp].abs().sum()) == 0.0


def test_box_term_applies_to_the_location_distribution():
    """With the score-function and entropy terms off and no expected-context captions, the
    attention's parameters learn from the box term alone: a term on α gives them a gradient, one
    on the sampled (one-hot, non-differentiable) location would not."""
    model = tiny_model("hard")
    imgs, caps = tiny_batch(b=4)
    cfg = replace(Config(), hard={"mix_mode": "off", "lambda_r": 0.0, "lambda_e": 0.0,
                                  "n_samples": 2, "baseline": "loo"},
                  supervision={"weight": 1.0})
    obj = H.HardAttention(cfg)
    obj.boxes = BoxSupervision(cfg)
    word = int(caps[0, 1])
    cover = torch.zeros(16)
    cover[:4] = 1.0  # the first row of the 4×4 grid
    obj.boxes.targets = {10: {word: cover}}
    params = [p for p in model.decoder.attention.parameters() if p.requires_grad]
    torch.manual_seed(0)
    loss, rec = obj.loss(model, imgs, caps, T.TrainState(), image_ids=torch.tensor([10, 11, 12, 13]))
    assert rec["box"] > 0 and rec["box_words"] >= 2  # caption 0, twice (two location samples)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    # and the mass on the box grows when only that term is followed
    opt = torch.optim.SGD(params, lr=0.5)
    for _ in range(20):
        opt.zero_grad()
        loss, rec2 = obj.loss(model, imgs, caps, T.TrainState(),
                              image_ids=torch.tensor([10, 11, 12, 13]))
        loss.backward()
        opt.step()
    assert rec2["box"] < rec["box"]


def test_estimator_options_are_validated():
    validate(replace(Config(), hard={"baseline": "loo", "n_samples": 2, "reward": "to_go"}))
    with pytest.raises(ConfigError, match="n_samples"):
        validate(replace(Config(), hard={"baseline": "loo", "n_samples": 1}))
    with pytest.raises(ConfigError, match="loo"):
        validate(replace(Config(), hard={"reward": "to_go"}))


def test_soft_model_decoded_with_the_chosen_cell_equals_hard_window_one():
    """--mode argmax on a soft model: the context is the most attended cell's annotation, as a
    window-1 hard model with the same weights decodes it; and it changes what is decoded."""
    soft = tiny_model("soft").eval()
    hard = tiny_model("hard").eval()
    hard.load_state_dict(soft.state_dict())
    imgs, _ = tiny_batch(b=6)
    with torch.no_grad():
        feats = soft.encode(imgs)
        a = greedy(soft, feats, max_len=8, mode="argmax")
        b = greedy(hard, feats, max_len=8, mode="argmax")
        e = greedy(soft, feats, max_len=8, mode="expectation")
    assert torch.equal(a.tokens, b.tokens)
    assert_close_fp32(a.scores, b.scores, k=64)
    assert not torch.allclose(a.scores, e.scores)


def test_mode_on_a_kind_that_cannot_use_it_is_said_once(caplog):
    from showattend import decoding

    model = tiny_model("local").eval()
    imgs, _ = tiny_batch(b=2)
    decoding._MODE_WARNED.discard("local")
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        feats = model.encode(imgs)
        decoding.decode(model, feats, beam=1, max_len=4, mode="argmax")
        decoding.decode(model, feats, beam=2, max_len=4, mode="argmax")
    lines = [r for r in caplog.records if "does not apply" in r.getMessage()]
    assert len(lines) == 1 and "local" in lines[0].getMessage()
