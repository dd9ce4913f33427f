"""Model, attention, decoding and checkpoint equivalences on tiny models."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_batch, tiny_model
from showattend.decoding import beam_search, greedy
from showattend.losses import doubly_stochastic, masked_cross_entropy
from showattend.models.attention import SCORES
from showattend.models.captioner import Captioner
from showattend.models.encoder import build_encoder
from showattend.vocab import END_ID, PAD_ID, START_ID, UNK_ID

SCORE_NAMES = sorted(SCORES)


@pytest.mark.parametrize("score", SCORE_NAMES)
@pytest.mark.parametrize("beta", ["scalar", "channel", "none"])
def test_every_parameter_gets_gradient_soft(score, beta):
    model = tiny_model("soft", score, beta=beta)
    imgs, caps = tiny_batch()
    out = model(imgs, caps)
    loss = masked_cross_entropy(out.logits, caps[:, 1:]) + doubly_stochastic(out.alphas, caps[:, 1:] != 0)
    loss.backward()
    # the additive score's output bias shifts every cell's score alike, which the softmax ignores:
    # its gradient is 0 but for rounding (exactly 0.0 on some hosts), so it need only be reached
    missing = [n for n, p in model.named_parameters()
               if p.grad is None or not (p.grad.abs().sum() > 0 or n.endswith("score.out.bias"))]
    assert missing == []


def test_forward_shapes_and_no_reordering():
    from tolerances import STEP_K, assert_close_fp32

    model = tiny_model()
    imgs, caps = tiny_batch(b=5, t=9)
    out = model(imgs, caps)
    assert out.logits.shape == (5, 8, 20)
    assert out.alphas.shape == (5, 8, 16)
    assert out.betas.shape == (5, 8)
    # the batch is never reordered: sample i alone gives the same logits as inside the batch
    model.eval()
    full = model(imgs, caps).logits
    one = model(imgs[2:3], caps[2:3]).logits
    assert_close_fp32(full[2:3], one, k=8 * STEP_K)  # a batch of 5 and of 1: kernels differ


def test_golden_loss_fixed_seed():
    model = tiny_model(seed=0)
    imgs, caps = tiny_batch(seed=1)
    out = model(imgs, caps)
    ce = masked_cross_entropy(out.logits, caps[:, 1:])
    ds = doubly_stochastic(out.alphas, caps[:, 1:] != 0)
    # recorded once; any change to initialisation, masking or the step equations moves them
    assert float(ce) == pytest.approx(GOLDEN_CE, abs=1e-4)
    assert float(ds) == pytest.approx(GOLDEN_DS, abs=1e-4)


GOLDEN_CE = 2.984903
GOLDEN_DS = 0.454388


@pytest.mark.parametrize("score", SCORE_NAMES)
def test_attention_maps_sum_to_one_and_move(score):
    model = tiny_model("soft", score)
    imgs, caps = tiny_batch()
    # give the score function something to react to
    for p in model.decoder.attention.parameters():
        torch.nn.init.normal_(p, std=0.5)
    out = model(imgs, caps)
    real = caps[:, 1:] != 0  # (B, T): the fast path leaves padded positions at zero
    sums = out.alphas.sum(-1)  # (B, T)
    torch.testing.assert_close(sums[real], torch.ones(int(real.sum())))
    assert (sums[~real] == 0).all()
    assert (out.alphas >= 0).all()
    both = real[:, 1:] & real[:, :-1]  # consecutive real steps
    change = (out.alphas[:, 1:] - out.alphas[:, :-1]).abs().sum(-1)  # (B, T-1)
    assert float(change[both].mean()) > 1e-3


@pytest.mark.parametrize("attention", ["soft", "hard"])
def test_beam_one_equals_greedy(attention):
    from tolerances import STEP_K, assert_close_fp32

    model = tiny_model(attention).eval()
    if attention == "hard":
        model.test_mode = "argmax"
    imgs, _ = tiny_batch(b=6)
    feats = model.encode(imgs)
    g = greedy(model, feats, max_len=12)
    b = beam_search(model, feats, beam=1, max_len=12)
    assert torch.equal(g.tokens, b.tokens)
    assert torch.equal(g.lengths, b.lengths)
    assert_close_fp32(g.scores, b.scores, k=12 * STEP_K)  # 12 steps
    assert_close_fp32(g.alphas, b.alphas, k=12 * STEP_K)


def image_dependent_model(attention: str = "soft", seed: int = 0
                          ) -> tuple[torch.nn.Module, torch.Tensor]:
    """A tiny model and annotations (6, 16, 18) for which every image gets its own caption.

    The untrained tiny model captions every image alike (its logits are dominated by the
    previous word), so a beam search that mixed up the images of a batch would go unnoticed. Here
    the annotations differ strongly between images and the decoder's state and context paths are
    scaled up, so the image decides the words.
    """
    model = tiny_model(attention, vocab_size=12, seed=seed).eval()
    if attention == "hard":
        model.test_mode = "argmax"
    with torch.no_grad():
        for name, p in model.decoder.named_parameters():
            if name.startswith(("L_z", "L_h", "init_", "lstm")):
                p.mul_(3.0)
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(6, 16, 18, generator=g) * 2  # (B, L, D): 16 cells of 16+2 channels
    return model, feats


@pytest.mark.parametrize("attention", ["soft", "hard"])
@pytest.mark.parametrize("beam", [2, 4])
def test_batched_beam_equals_one_by_one(attention, beam):
    """Each image of a batch gets exactly the caption, score and maps it gets alone — with
    captions that differ between images, so images mixed up inside the batch would show."""
    from tolerances import STEP_K, assert_close_fp32

    model, feats = image_dependent_model(attention)
    batched = beam_search(model, feats, beam=beam, max_len=10)
    captions = {tuple(batched.tokens[i, : int(batched.lengths[i])].tolist()) for i in range(6)}
    assert len(captions) >= 4, captions  # the premise: the image decides the caption
    for i in range(6):
        single = beam_search(model, feats[i: i + 1], beam=beam, max_len=10)
        n = int(single.lengths[0])
        assert int(batched.lengths[i]) == n
        assert torch.equal(batched.tokens[i, : n + 1], single.tokens[0, : n + 1])
        k = 10 * STEP_K  # 10 steps, in a batch of 6·beam rows and of beam rows
        assert_close_fp32(batched.scores[i], single.scores[0], k=k)
        assert_close_fp32(batched.alphas[i, : n + 1], single.alphas[0, : n + 1], k=k)
        assert_close_fp32(batched.betas[i, : n + 1], single.betas[0, : n + 1], k=k)
        assert torch.equal(batched.locations[i, : n + 1], single.locations[0, : n + 1])
    # a batch in another order gives the same captions, reordered the same way
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    shuffled = beam_search(model, feats[perm], beam=beam, max_len=10)
    assert torch.equal(shuffled.lengths, batched.lengths[perm])
    assert torch.equal(shuffled.tokens, batched.tokens[perm])


@pytest.mark.parametrize("attention", ["soft", "hard"])
def test_beam_caption_scores_and_maps_match_teacher_forcing(attention):
    """Re-scoring each returned caption with the model (teacher forcing) gives the beam's score
    and attention maps: catches hypotheses whose words, state or history were reordered apart
    (batched == one-by-one cannot: a bug inside one image's beams is the same in both)."""
    from tolerances import STEP_K, assert_close_fp32

    model, feats = image_dependent_model(attention)
    out = beam_search(model, feats, beam=3, max_len=10)
    mode = "argmax" if attention == "hard" else "expectation"
    for i in range(6):
        n = int(out.lengths[i])
        caps = torch.cat([torch.tensor([START_ID]), out.tokens[i, : n + 1]])[None]  # (1, n+2)
        with torch.no_grad():
            tf = model(None, caps, mode=mode, feats=feats[i: i + 1])
        logp = torch.log_softmax(tf.logits[0], -1)  # (n+1, V)
        score = logp.gather(1, caps[0, 1:].unsqueeze(1)).sum()
        assert_close_fp32(out.scores[i], score, k=10 * STEP_K)  # ≤ 10 steps
        assert_close_fp32(out.alphas[i, : n + 1], tf.alphas[0], k=10 * STEP_K)


def test_beam_never_worse_than_greedy_and_always_ends():
    model = tiny_model(vocab_size=12).eval()
    imgs, _ = tiny_batch(b=8, vocab_size=12)
    feats = model.encode(imgs)
    g = greedy(model, feats, max_len=6)
    b = beam_search(model, feats, beam=5, max_len=6)
    assert (b.scores >= g.scores - 1e-5).all()
    # untrained model rarely emits <end>: max_len forces it, every caption is complete
    assert (b.lengths <= 6).all()
    rows = torch.arange(8)
    assert (b.tokens[rows, b.lengths] == 2).all()


# word ids of the hand-made bigram model below (0-3 are <pad>, <start>, <end>, <unk>)
A, B, C, D, E = 4, 5, 6, 7, 8


def bigram_model() -> torch.nn.Module:
    """A real Captioner whose weights are set by hand so that p(next word) depends only on the
    previous word: embedding = identity, L_h = L_z = 0, L_o = a table of log-probabilities.

    From <start>: "A" (0.58) or "B" (0.39); after A, <end> (0.9); B → C → D → E → <end>, each
    0.97. So "A" (log p = -0.650) beats "B C D E" (log p = -1.064) on raw log-probability, but
    per token (÷ 2 vs ÷ 5 with <end>) the long caption wins: -0.325 vs -0.213.
    """
    v = 12
    enc = build_encoder("shapes_cnn", grid=4, channels=16, coords=True)
    model = Captioner.build(enc, v, attention="soft", attn_dim=8, embed_dim=v, hidden_dim=8,
                            dropout=0.0).eval()
    table = torch.full((v, v), 1e-3)  # table[next, prev] = p(next | prev), before normalising
    table[:, START_ID] = 0.03 / (v - 4)
    table[A, START_ID], table[B, START_ID] = 0.58, 0.39
    table[:, A] = 0.1 / (v - 3)
    table[END_ID, A] = 0.9
    for prev, nxt in ((B, C), (C, D), (D, E), (E, END_ID)):
        table[:, prev] = 0.03 / (v - 3)
        table[nxt, prev] = 0.97
    for prev in (END_ID, UNK_ID, *range(E + 1, v)):
        table[:, prev] = 0.1 / (v - 3)
        table[END_ID, prev] = 0.9
    for col in range(v):  # <pad> and <start> are never generated: drop them from the table
        table[PAD_ID, col] = table[START_ID, col] = 0.0
        table[:, col] /= table[:, col].sum()
    dec = model.decoder
    with torch.no_grad():
        dec.embed.weight.copy_(torch.eye(v))
        dec.L_h.weight.zero_()
        dec.L_h.bias.zero_()
        dec.L_z.weight.zero_()
        dec.L_o.weight.copy_(table.clamp_min(1e-30).log())
        dec.L_o.bias.zero_()
    return model


@pytest.mark.parametrize("length_norm, words", [
    (0.0, [A]),  # raw log p: -0.650 vs -1.064
    (0.5, [A]),  # ÷ √(n+1): -0.460 vs -0.476
    (1.0, [B, C, D, E]),  # ÷ (n+1): -0.325 vs -0.213
])
def test_beam_length_normalisation_picks_the_longer_caption(length_norm, words):
    """A short and a long caption compete; length_norm decides which one the beam returns."""
    model = bigram_model()
    feats = model.encode(torch.rand(3, 3, 32, 32))  # the bigram model ignores the image
    out = beam_search(model, feats, beam=2, max_len=8, length_norm=length_norm)
    n = len(words)
    assert out.lengths.tolist() == [n] * 3
    assert out.tokens[:, : n + 1].tolist() == [words + [END_ID]] * 3
    assert (out.tokens[:, n + 1:] == PAD_ID).all()
    expected = math.log(0.58) + math.log(0.9) if n == 1 else math.log(0.39) + 4 * math.log(0.97)
    torch.testing.assert_close(out.scores, torch.full((3,), expected), atol=1e-4, rtol=0)
    # greedy follows the most likely first word
    assert greedy(model, feats, max_len=8).tokens[:, :2].tolist() == [[A, END_ID]] * 3


def test_save_load_identical_outputs(tmp_path):
    from showattend.checkpoint import load_checkpoint, save_checkpoint

    model = tiny_model(seed=4).eval()
    imgs, caps = tiny_batch()
    save_checkpoint(tmp_path / "m.pt", {"model": model.state_dict(), "config": {}, "vocab": {},
                                        "preprocess": {}})
    other = tiny_model(seed=99).eval()
    other.load_state_dict(load_checkpoint(tmp_path / "m.pt")["model"])
    assert torch.equal(model(imgs, caps).logits, other(imgs, caps).logits)
    f = model.encode(imgs)
    assert torch.equal(beam_search(model, f, 3).tokens, beam_search(other, other.encode(imgs), 3).tokens)
