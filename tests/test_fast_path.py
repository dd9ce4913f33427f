"""The teacher-forced fast path (packed, hoisted, shrinking batch) equals the step-by-step path."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_batch, tiny_model
from showattend.losses import doubly_stochastic, masked_cross_entropy, reinforce_loss
from showattend.models.captioner import Captioner
from showattend.models.encoder import build_encoder


def _loss(model, out, caps, kind):
    targets = caps[:, 1:]
    mask = targets != 0
    if kind == "soft":
        return masked_cross_entropy(out.logits, targets) + doubly_stochastic(out.alphas, mask)
    hl = reinforce_loss(out.logits, targets, out.log_probs, out.entropies, baseline=-3.0,
                        lambda_r=0.5, lambda_e=0.1)
    return hl.loss + doubly_stochastic(out.alphas, mask)


def _run(model, fn, imgs, caps, kind, **kw):
    model.zero_grad()
    out = fn(imgs, caps, **kw)
    loss = _loss(model, out, caps, kind)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, loss.detach(), grads


def _caps_with_lengths(b=7, t=11, vocab=20, seed=2):
    """Captions of very different lengths, in no particular order (exercises sort + shrink)."""
    g = torch.Generator().manual_seed(seed)
    caps = torch.randint(4, vocab, (b, t), generator=g)
    caps[:, 0] = 1
    ends = [3, t - 1, 5, 1, t - 1, 7, 2][:b]
    for i, e in enumerate(ends):
        caps[i, e] = 2
        caps[i, e + 1:] = 0
    return caps


@pytest.mark.parametrize("kind,mix", [("soft", None), ("hard", None), ("hard", "sample"),
                                      ("hard", "expectation")])
@pytest.mark.parametrize("beta,deep", [("scalar", True), ("channel", True), ("none", False)])
def test_fast_path_equals_stepwise_loss_and_gradients(kind, mix, beta, deep):
    from tolerances import STEP_K, assert_close_fp32, norm_of

    torch.manual_seed(0)
    enc = build_encoder("shapes_cnn", grid=4, channels=16, coords=True)
    model = Captioner.build(enc, 20, attention=kind, attn_dim=16, window=3 if kind == "hard" else 1,
                            embed_dim=16, hidden_dim=32, dropout=0.0, beta=beta, deep_output=deep)
    for p in model.decoder.attention.parameters():  # peaked maps: sampling matters
        torch.nn.init.normal_(p, std=0.5)
    imgs, _ = tiny_batch(b=7)
    caps = _caps_with_lengths()
    kw = {}
    if kind == "hard":
        kw["noise"] = torch.rand(7, caps.shape[1] - 1, generator=torch.Generator().manual_seed(4))
        if mix == "sample":
            kw["mix"] = torch.tensor([True, False, False, True, False, True, False])
        elif mix == "expectation":
            kw["mode"] = "expectation"
    fast, loss_f, g_f = _run(model, model.forward, imgs, caps, kind, **kw)
    slow, loss_s, g_s = _run(model, model.forward_stepwise, imgs, caps, kind, **kw)
    k = 10 * STEP_K  # 10 steps
    assert_close_fp32(loss_f, loss_s, k=k)
    assert g_f.keys() == g_s.keys() and len(g_f) == len(list(model.parameters()))
    scale = norm_of(g_s.values())  # a softmax's shift-invariant bias has a gradient of 0 ± rounding
    for name in g_f:  # back through the 10 steps
        assert_close_fp32(g_f[name], g_s[name], k=2 * k, scale=scale, msg=name)
    real = caps[:, 1:] != 0  # (B, T)
    for field in ("logits", "alphas", "betas", "log_probs", "entropies"):
        a, b = getattr(fast, field), getattr(slow, field)
        assert_close_fp32(a[real], b[real], k=k, msg=field)
        assert (a[~real] == 0).all(), field  # padding costs nothing and carries nothing


def test_fast_path_does_not_reorder_batch():
    from tolerances import STEP_K, assert_close_fp32

    model = tiny_model().eval()
    imgs, _ = tiny_batch(b=7)
    caps = _caps_with_lengths()
    full = model(imgs, caps)
    for i in range(7):
        one = model(imgs[i:i + 1], caps[i:i + 1])
        n = int((caps[i, 1:] != 0).sum())
        assert_close_fp32(full.logits[i, :n], one.logits[0, :n], k=10 * STEP_K)  # ≤ 10 steps


def test_sampled_locations_follow_the_noise_not_the_batch_layout():
    """Hard sampling by inverse CDF: a row's location depends on its own draw only."""
    from tolerances import STEP_K, assert_close_fp32

    model = tiny_model("hard").eval()  # eval: BatchNorm must not see the batch either
    imgs, caps = tiny_batch(b=4)
    noise = torch.rand(4, caps.shape[1] - 1)
    whole = model(imgs, caps, noise=noise)
    part = model(imgs[2:], caps[2:], noise=noise[2:])
    real = caps[2:, 1:] != 0
    assert_close_fp32(whole.log_probs[2:][real], part.log_probs[real], k=6 * STEP_K)  # 6 steps


# --- beam search: back-pointers, shrinking working batch, n-gram blocking -------------------------

def test_block_repeats_bans_exactly_the_word_that_would_repeat_a_trigram():
    from showattend.decoding import _block_repeats

    hist = torch.tensor([[1, 5, 6, 7, 5, 6],    # "5 6" seen before, followed by 7 → ban 7
                         [1, 5, 6, 7, 8, 9]])   # last pair "8 9" new → ban nothing
    logp = torch.zeros(2, 10)
    out = _block_repeats(logp, hist, 3)
    assert torch.isinf(out[0, 7]) and int(torch.isinf(out[0]).sum()) == 1
    assert not torch.isinf(out[1]).any()
    out2 = _block_repeats(torch.zeros(2, 10), hist, 2)  # bigrams: after 6 came 7 → ban 7; row 1: 9 new
    assert torch.isinf(out2[0, 7]) and not torch.isinf(out2[1]).any()


def _repeating_model():
    """A tiny model whose greedy captions repeat themselves (bias towards a 2-word loop)."""
    model = tiny_model(vocab_size=12).eval()
    with torch.no_grad():
        model.decoder.L_o.bias[2] = -6.0  # <end> unlikely: captions run to max_len
        model.decoder.embed.weight.mul_(4.0)
    return model


@pytest.mark.parametrize("beam", [1, 3])
def test_no_repeat_ngram_leaves_no_repeated_trigram(beam):
    from showattend.decoding import decode

    model = _repeating_model()
    imgs, _ = tiny_batch(b=6, vocab_size=12)
    feats = model.encode(imgs)
    plain = decode(model, feats, beam=beam, max_len=14)

    def trigram_repeats(dec):
        n = 0
        for i in range(dec.tokens.shape[0]):
            words = dec.tokens[i, : int(dec.lengths[i])].tolist()
            grams = list(zip(words, words[1:], words[2:]))
            n += len(grams) - len(set(grams))
        return n

    assert trigram_repeats(plain) > 0  # the model does repeat itself …
    blocked = decode(model, feats, beam=beam, max_len=14, no_repeat_ngram=3)
    assert trigram_repeats(blocked) == 0  # … and blocking removes every repeat


def test_beam_one_equals_greedy_with_blocking():
    from showattend.decoding import beam_search, greedy

    model = _repeating_model()
    imgs, _ = tiny_batch(b=5, vocab_size=12)
    feats = model.encode(imgs)
    from tolerances import STEP_K, assert_close_fp32

    g = greedy(model, feats, 12, no_repeat_ngram=3)
    b = beam_search(model, feats, 1, 12, no_repeat_ngram=3)
    assert torch.equal(g.tokens, b.tokens)
    assert_close_fp32(g.scores, b.scores, k=12 * STEP_K)  # 12 steps


def test_beam_search_rebuilds_maps_of_the_chosen_sequence():
    """Back-pointer reconstruction: the returned words, score and maps are those of re-running the
    decoder step by step along the returned words (teacher forcing on the chosen caption)."""
    from showattend.decoding import beam_search
    from tolerances import STEP_K, assert_close_fp32

    model = tiny_model(vocab_size=12).eval()
    imgs, _ = tiny_batch(b=5, vocab_size=12)
    feats = model.encode(imgs)
    dec = beam_search(model, feats, beam=4, max_len=9)
    for i in range(5):
        n = int(dec.lengths[i])
        caps = torch.cat([torch.tensor([1]), dec.tokens[i, : n + 1]]).unsqueeze(0)  # <start> … <end>
        out = model.forward_stepwise(None, caps, feats=feats[i: i + 1])
        logp = torch.log_softmax(out.logits[0], -1)  # (n+1, V)
        score = logp.gather(1, caps[0, 1:].unsqueeze(1)).sum()
        assert_close_fp32(dec.scores[i], score, k=9 * STEP_K)  # ≤ 9 steps
        assert_close_fp32(dec.alphas[i, : n + 1], out.alphas[0], k=9 * STEP_K)


def test_beam_wider_than_the_vocabulary_still_returns_the_best_caption():
    """With 4 ids (only <end> and <unk> usable) and beam 5, beams at -inf remain; they must not
    keep the image open (it used to come back empty with score 0)."""
    from showattend.decoding import beam_search

    model = tiny_model(vocab_size=4).eval()
    imgs, _ = tiny_batch(b=3)
    feats = model.encode(imgs)
    wide = beam_search(model, feats, beam=5, max_len=6)
    narrow = beam_search(model, feats, beam=3, max_len=6)
    assert torch.isfinite(wide.scores).all() and (wide.scores < 0).all()
    assert (wide.scores >= narrow.scores - 1e-5).all()  # more beams never find a worse caption
