"""The REINFORCE training path, measured through the code that trains: ``reinforce_loss`` (the
estimator, its baseline and its entropy bonus) and ``train_step`` (the moving-average baseline).

Every test here fails on a deliberately broken estimator: the baseline ignored (advantage = reward),
the baseline never updated or averaged over the wrong captions, the entropy bonus with its sign
flipped. Any constant baseline leaves the estimator unbiased, so unbiasedness alone (tested in
test_hard.py) cannot see a missing baseline: only its variance can.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import showattend.train as T
import showattend.train.objectives.hard as H
from conftest import tiny_batch, tiny_model
from showattend.config import Config, replace
from showattend.losses import reinforce_loss
from showattend.vocab import PAD_ID

DECAY = 0.9  # HardConfig.baseline_decay default: b ← 0.9 b + 0.1 r̄


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is ~10× faster than two on a shared 2-core machine (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _attention_params(model) -> list[torch.nn.Parameter]:
    return [p for p in model.decoder.attention.parameters() if p.requires_grad]


def _flat_grad(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                      for g, p in zip(grads, params)])


# ---------------------------------------------------------------------------------------------
# Variance reduction by the moving-average baseline, through reinforce_loss
# ---------------------------------------------------------------------------------------------


def _toy(n_loc: int = 5, vocab: int = 4, seed: int = 0):
    """Enumerable problem: α = softmax(θ) over n_loc cells; log p(y|s) = log_softmax(W[s])[y]."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(n_loc, generator=g, requires_grad=True)
    W = torch.randn(n_loc, vocab, generator=g, requires_grad=True)
    return theta, W, 2  # target word y = 2


def _toy_loss(theta, W, y, samples: torch.Tensor, baseline: float):
    """reinforce_loss of one-word captions, one per sampled location in ``samples`` (N,)."""
    log_alpha = torch.log_softmax(theta, 0)
    logits = W[samples].unsqueeze(1)  # (N, 1, V)
    targets = torch.full((len(samples), 1), y)  # (N, 1)
    return reinforce_loss(logits, targets, log_alpha[samples].unsqueeze(1),
                          torch.zeros(len(samples), 1), baseline, lambda_r=1.0, lambda_e=0.0)


def _moving_baseline(rewards_of_batches) -> float:
    """The training rule: first value = first mean reward, then b ← 0.9 b + 0.1 r̄."""
    b = None
    for r in rewards_of_batches:
        r_bar = float(r.mean())
        b = r_bar if b is None else DECAY * b + (1 - DECAY) * r_bar
    return b


def test_toy_baseline_reduces_variance_of_reinforce_loss_gradient():
    """Exact variance (enumerating every location) of the single-sample θ-gradient that
    reinforce_loss produces, with the moving baseline vs b = 0."""
    from tolerances import assert_close_fp32

    theta, W, y = _toy()
    alpha = torch.softmax(theta, 0).detach()
    reward = torch.log_softmax(W, 1)[:, y].detach()  # (n_loc,) log p(y|s) for every location s
    torch.manual_seed(0)
    batches = [_toy_loss(theta, W, y, torch.multinomial(alpha, 16, replacement=True), 0.0).reward
               for _ in range(60)]
    b_moving = _moving_baseline(batches)
    mean_reward = float((alpha * reward).sum())
    assert abs(b_moving - mean_reward) < 0.15  # the average tracks E[r] (here -1.62)

    def per_location_grads(b: float) -> torch.Tensor:  # (n_loc, n_loc): g_s for s = 0..n-1
        return torch.stack([torch.autograd.grad(-_toy_loss(theta, W, y, torch.tensor([s]), b).loss,
                                                theta)[0] for s in range(len(alpha))])

    def variance(g: torch.Tensor) -> float:
        mean = (alpha.unsqueeze(1) * g).sum(0)
        return float((alpha * ((g - mean) ** 2).sum(1)).sum())

    g0, gb = per_location_grads(0.0), per_location_grads(b_moving)
    # the estimator itself: g_s = (r_s − b) ∇θ log α_s = (r_s − b)(e_s − α), one word per caption
    eye = torch.eye(len(alpha))
    k = len(alpha) + W.shape[1]  # the softmax over the locations, the log-softmax over the words
    for g, b in ((g0, 0.0), (gb, b_moving)):
        assert_close_fp32(g, (reward - b).unsqueeze(1) * (eye - alpha), k=k)
    # same mean (any constant baseline is unbiased), far smaller spread with the moving baseline
    terms = alpha.unsqueeze(1) * gb  # their sum over the locations cancels (it is b-free):
    assert_close_fp32((alpha.unsqueeze(1) * g0).sum(0), terms.sum(0), k=k + len(alpha),
                      scale=terms.abs().sum(0).norm())  # the bound scales with Σ|terms|
    v0, vb = variance(g0), variance(gb)
    assert vb < 0.5 * v0, (vb, v0)  # measured: 0.296 vs 1.196


def test_real_batch_baseline_reduces_variance_of_attention_gradient():
    """A tiny hard model on a real batch: many sampled score-function gradients of the attention
    parameters from reinforce_loss, with the baseline train_step maintains vs b = 0."""
    model = tiny_model("hard")
    imgs, caps = tiny_batch(b=8)
    targets = caps[:, 1:]
    cfg = replace(Config(), hard={"mix_mode": "off", "lambda_e": 0.0})
    state = T.TrainState()
    torch.manual_seed(0)
    for _ in range(10):  # the training step keeps the moving average (no optimiser step here)
        T.train_step(model, imgs, caps, cfg, state)
    b = state.baseline
    params = _attention_params(model)
    grads = {0.0: [], b: []}
    for k in range(40):
        torch.manual_seed(100 + k)
        out = model(imgs, caps, mode="sample")
        for base in grads:  # the same sampled locations for both baselines
            hl = reinforce_loss(out.logits, targets, out.log_probs, out.entropies, base,
                                lambda_r=1.0, lambda_e=0.0)
            grads[base].append(_flat_grad(hl.loss, params))
    G0, Gb = torch.stack(grads[0.0]), torch.stack(grads[b])  # (draws, P)
    v0, vb = float(G0.var(0).sum()), float(Gb.var(0).sum())
    assert b < -10  # rewards are summed log-probabilities of ~5 words under an untrained model
    assert vb < 0.2 * v0, (b, vb, v0)  # measured: ratio ≈ 0.03


# ---------------------------------------------------------------------------------------------
# The moving-average baseline, step by step through train_step
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mix_mode", ["off", "sample", "batch"])
def test_baseline_update_rule_through_train_step(monkeypatch, mix_mode):
    """b starts at the first mean reward of the sampled captions, then b ← 0.9 b + 0.1 r̄ with r̄
    over the sampled captions only; batches that used the expected context leave b alone."""
    from tolerances import assert_close_fp32, fp32_rtol

    model = tiny_model("hard")
    imgs, caps = tiny_batch(b=8)
    targets = caps[:, 1:]
    cfg = replace(Config(), hard={"mix_mode": mix_mode, "mix_prob": 0.5, "lambda_e": 0.0})
    calls = []
    real = H.reinforce_loss

    def spy(logits, targets_, log_probs, entropies, baseline, lambda_r, lambda_e, sampled=None,
            reward_kind="caption"):
        hl = real(logits, targets_, log_probs, entropies, baseline, lambda_r, lambda_e, sampled,
                  reward_kind)
        calls.append((baseline, hl.reward.clone(), sampled.clone(), logits.logits.detach()))
        return hl

    monkeypatch.setattr(H, "reinforce_loss", spy)
    state = T.TrainState()
    expected = None  # the baseline state.baseline must hold after each step
    kinds = []
    torch.manual_seed(3)
    for _ in range(10):
        n = len(calls)
        _, rec = T.train_step(model, imgs, caps, cfg, state)
        if len(calls) == n:  # an expected-context batch ("batch" mixing): no rewards at all
            kinds.append("expectation")
            assert rec["soft_batch"] == 1.0
            assert state.baseline == expected
            continue
        b_used, reward, sampled, logits = calls[-1]
        # rewards really are log p(caption) summed over its words
        nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=PAD_ID,
                              reduction="none").sum(1)  # (B,)
        assert_close_fp32(reward, -nll, k=20 + targets.shape[1])  # log-softmaxes, summed words
        kinds.append("mixed" if not bool(sampled.all()) else "sampled")
        r_bar = float(reward[sampled].mean())
        rel = fp32_rtol(len(reward))  # means of ≤ 8 fp32 rewards, each rounded its own way
        if expected is None:  # first value: the first mean reward (of sampled captions)
            assert b_used == pytest.approx(r_bar, rel=rel, abs=0)
            expected = r_bar
        else:
            assert b_used == pytest.approx(expected, rel=rel, abs=0)
            expected = DECAY * expected + (1 - DECAY) * r_bar
        assert state.baseline == pytest.approx(expected, rel=rel, abs=0)
        assert rec["baseline"] == pytest.approx(b_used, abs=1e-6)  # the logged value
    # the run exercised what the mode is about (the seed is fixed: these are not flaky)
    if mix_mode == "sample":
        assert kinds.count("mixed") >= 5, kinds
        # and mixing matters: the mean over all captions differs from the sampled ones' mean
        _, reward, sampled, _ = calls[0]
        assert abs(float(reward.mean()) - float(reward[sampled].mean())) > 1e-3
    elif mix_mode == "batch":
        assert 2 <= kinds.count("expectation") <= 8, kinds
    else:
        assert kinds == ["sampled"] * 10


def test_baseline_changes_every_sampled_step():
    """Without a spy: train_step leaves a float baseline in the state, a new one every step."""
    model = tiny_model("hard")
    imgs, caps = tiny_batch(b=8)
    cfg = replace(Config(), hard={"mix_mode": "off", "lambda_e": 0.0})
    state = T.TrainState()
    torch.manual_seed(0)
    seen = []
    for _ in range(5):
        T.train_step(model, imgs, caps, cfg, state)
        seen.append(state.baseline)
    assert all(isinstance(b, float) for b in seen)
    assert len(set(seen)) == 5


# ---------------------------------------------------------------------------------------------
# Entropy bonus: sign, scale, and its gradient
# ---------------------------------------------------------------------------------------------


def _peaky_hard_model():
    model = tiny_model("hard")
    torch.manual_seed(7)
    for p in model.decoder.attention.parameters():  # peaky maps: entropy well below log L
        torch.nn.init.normal_(p, std=0.5)
    return model


def test_entropy_term_sign_and_scale_match_hand_computation():
    from tolerances import assert_close_fp32, fp32_rtol

    model = _peaky_hard_model()
    imgs, caps = tiny_batch(b=6)
    targets = caps[:, 1:]
    mask = targets != PAD_ID
    torch.manual_seed(0)
    out = model(imgs, caps, mode="sample")
    a = out.alphas.double()  # (B, T, L)
    # (B, T) entropy of each attention map, nats (padded steps: all-zero maps, entropy 0)
    hand = -(a * a.clamp_min(1e-300).log()).sum(-1)
    n_cells = a.shape[-1]
    assert_close_fp32(out.entropies, hand, k=n_cells)  # fp32 against float64: −Σ α log α
    mean_h = float((hand * mask).sum() / mask.sum())  # per non-padded step
    assert 0.5 < mean_h < 0.95 * float(torch.log(torch.tensor(16.0)))  # not uniform
    args = (out.logits, targets, out.log_probs, out.entropies, -12.0, 0.01)
    plain = reinforce_loss(*args, lambda_e=0.0)
    lam = 0.3
    bonus = reinforce_loss(*args, lambda_e=lam)
    k = n_cells + mask.numel()  # entropies, then their mean over the B·T steps
    assert float(bonus.entropy) == pytest.approx(mean_h, rel=fp32_rtol(k), abs=0)
    # a bonus: higher entropy lowers the loss by exactly λ_e · mean entropy per token — a difference
    # of two losses, each rounded at its own size (+ 20 words' log-softmax)
    assert_close_fp32(bonus.loss - plain.loss, -lam * mean_h, k=k + 20,
                      scale=abs(float(plain.loss)))
    assert float(bonus.loss) < float(plain.loss)
    torch.testing.assert_close(bonus.score_function, plain.score_function)
    torch.testing.assert_close(bonus.ce, plain.ce)


def test_entropy_gradient_step_through_train_step_raises_attention_entropy():
    """With λ_r = 0 and no mixing, the attention parameters learn only from the entropy bonus:
    one gradient step of train_step's loss must raise the attention entropy."""
    model = _peaky_hard_model()
    imgs, caps = tiny_batch(b=6)
    cfg = replace(Config(), hard={"mix_mode": "off", "lambda_r": 0.0, "lambda_e": 1.0})
    params = _attention_params(model)

    def entropy_after_steps(n_steps: int) -> float:
        for _ in range(n_steps):
            torch.manual_seed(0)
            loss, _ = T.train_step(model, imgs, caps, cfg, T.TrainState(baseline=-12.0))
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p -= 0.5 * g  # plain gradient descent on the loss
        torch.manual_seed(0)  # same location samples for the measurement
        _, rec = T.train_step(model, imgs, caps, cfg, T.TrainState(baseline=-12.0))
        return rec["entropy"]

    h0 = entropy_after_steps(0)
    h1 = entropy_after_steps(1)
    h3 = entropy_after_steps(2)
    assert h1 > h0 + 0.02 and h3 > h1, (h0, h1, h3)
