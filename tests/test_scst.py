"""Self-critical sequence training: the in-process CIDEr-D against pycocoevalcap's, the
estimator's gradient, the baseline, and a run that resumes bit for bit."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest
import torch

import showattend.train.loop as L
from conftest import signal_at_step, tiny_model, tiny_toml
from showattend import config as C
from showattend.checkpoint import load_checkpoint
from showattend.cider import CiderD
from showattend.data.coco import ImageRecord
from showattend.train import fit
from showattend.train.objectives import SelfCritical, TrainingData, objective_for
from showattend.train.objectives import scst as S
from showattend.train.state import TrainState
from showattend.vocab import Vocab, tokenize

ASSETS = Path(__file__).parent / "assets"


def _flickr_captions() -> dict[str, list[str]]:
    """250 Flickr8k photos' five human captions each (a sample of Flickr8k.token.txt)."""
    caps: dict[str, list[str]] = collections.defaultdict(list)
    for line in (ASSETS / "flickr8k_captions_250.txt").read_text().splitlines():
        key, text = line.split("\t")
        caps[key.split("#")[0]].append(" ".join(tokenize(text)))
    return caps


def test_cider_d_equals_pycocoevalcap_on_flickr8k_captions():
    from pycocoevalcap.cider.cider import Cider

    caps = _flickr_captions()
    keys = sorted(caps)
    gts = {k: caps[k][1:] for k in keys}  # each photo's first caption against the other four
    res = {k: caps[k][:1] for k in keys}
    mean, per = Cider().compute_score(gts, res)
    ours = CiderD(gts).score([res[k][0] for k in keys], keys)
    assert np.abs(ours - np.asarray(per)).max() < 1e-6
    assert abs(ours.mean() - mean) < 1e-6
    assert 0.3 < mean < 2.0  # real captions: neither zero nor degenerate


def test_cider_d_with_uneven_references_empty_candidates_and_per_call_refs():
    from pycocoevalcap.cider.cider import Cider

    caps = _flickr_captions()
    keys = sorted(caps)[:70]
    # 1 to 4 references per photo, some candidates empty or repeated words, more than one block
    gts = {k: caps[k][1: 2 + i % 4] for i, k in enumerate(keys)}
    cand = {k: caps[k][0] if i % 9 else ("" if i % 2 else "a a a a dog dog") for i, k in
            enumerate(keys)}
    _, per = Cider().compute_score(gts, {k: [cand[k]] for k in keys})
    scorer = CiderD(gts)
    ours = scorer.score([cand[k] for k in keys], keys)
    assert np.abs(ours - np.asarray(per)).max() < 1e-6
    again = scorer.score([cand[k].split() for k in keys], keys, refs=[gts[k] for k in keys])
    np.testing.assert_allclose(again, ours, rtol=0, atol=1e-12)  # token lists, refs per call
    with pytest.raises(KeyError, match="no reference captions"):
        scorer.score(["a dog"], ["not-an-image"])


def test_scst_loss_gradient_is_minus_advantage_times_score_on_a_hand_built_case():
    # one categorical word: ∇θ log softmax(θ)[x] = onehot(x) − p
    theta = torch.tensor([0.3, -1.0, 0.5], requires_grad=True)
    x = torch.tensor([0, 2, 2, 1])
    adv = torch.tensor([1.5, -0.5, 0.25, -1.25])
    S.scst_loss(torch.log_softmax(theta, 0)[x], adv).backward()
    p = torch.softmax(theta.detach(), 0)
    expected = -sum(a * (torch.nn.functional.one_hot(k, 3).float() - p) for a, k in zip(adv, x)) / 4
    torch.testing.assert_close(theta.grad, expected, rtol=1e-6, atol=1e-7)


def test_baseline_is_the_mean_of_the_other_samples():
    r = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]])
    torch.testing.assert_close(S.leave_one_out_baseline(r), torch.tensor([[2.5, 2.0, 1.5],
                                                                          [3.0, 3.0, 0.0]]))
    # the baseline of sample k does not move with sample k's own reward
    r2 = r.clone()
    r2[0, 0] = 100.0
    assert float(S.leave_one_out_baseline(r2)[0, 0]) == 2.5
    with pytest.raises(ValueError, match="at least 2"):
        S.leave_one_out_baseline(r[:, :1])


WORDS = ["a", "dog", "cat", "runs", "on", "grass", "red", "ball", "the", "man", "in", "water",
         "snow", "boy", "jumps", "sits"]


def _bound(cfg: C.Config, *, samples: int = 4, baseline: str = "mean",
           end_token: bool = False) -> SelfCritical:
    cfg = C.replace(cfg, train={"objective": "scst", "log_every": 1000},
                    scst={"samples": samples, "baseline": baseline, "end_token": end_token})
    vocab = Vocab(["<pad>", "<start>", "<end>", "<unk>", *WORDS])
    refs = ["a dog runs on the grass", "a dog in the snow", "the red ball", "a man in the water",
            "a boy jumps in the water", "the cat sits on the grass"]
    recs = [ImageRecord(i, Path(f"{i}.jpg"), tuple(refs[i: i + 4]), "train") for i in range(3)]
    obj = objective_for(cfg, tiny_model(vocab_size=len(vocab), dropout=0.3))
    assert isinstance(obj, SelfCritical)
    obj.bind(TrainingData(recs, vocab, None, (4, 4)))
    return obj


def _loss_and_grads(obj: SelfCritical, model, seed: int = 0):
    torch.manual_seed(seed)
    feats = model.encode(torch.randn(3, 3, 32, 32)).detach()
    model.zero_grad()
    loss, rec = obj.loss(model, feats, torch.zeros(3, 2, dtype=torch.long), TrainState(),
                         features=True, image_ids=torch.arange(3))
    loss.backward()
    return loss, rec, [p.grad for p in model.decoder.parameters()], feats


def test_gradient_equals_sum_of_advantage_times_score_of_the_drawn_captions(monkeypatch):
    """The objective's gradient = −(1/N) Σ_k (r_k − b_k) ∇ log p(sample_k), with log p taken by
    the slow step-by-step reference decoder over each sample's words and <end> only."""
    model = tiny_model(vocab_size=len(WORDS) + 4, dropout=0.3)
    obj = _bound(C.Config())
    # a reward that differs between samples (the untrained model's words rarely meet CIDEr's)
    monkeypatch.setattr(obj, "rewards", lambda toks, keys: (toks % 5).float().sum(1) / 10)
    drawn = {}
    real_sample = S.sample
    monkeypatch.setattr(S, "sample", lambda *a, **k: drawn.setdefault("s", real_sample(*a, **k)))
    _, rec, grads, feats = _loss_and_grads(obj, model)
    toks = drawn["s"].tokens  # (N, T)
    keys = [i for i in range(3) for _ in range(4)]
    r = obj.rewards(toks, keys)
    adv = r - S.leave_one_out_baseline(r.view(3, 4)).flatten()
    assert float(adv.abs().sum()) > 0  # a case where the samples differ in reward
    model.eval()  # the samples and their replay run without dropout
    caps = torch.cat([torch.full_like(toks[:, :1], 1), toks], 1)
    out = model.forward_stepwise(None, caps, feats=feats.repeat_interleave(4, 0))
    logp = torch.log_softmax(out.logits, -1).view(len(toks), toks.shape[1], -1)
    tok_lp = logp.gather(2, toks.unsqueeze(2)).squeeze(2)  # (N, T)
    seq = (tok_lp * (toks != 0)).sum(1)
    model.zero_grad()
    (-(adv * seq).sum() / len(seq)).backward()
    for g, p in zip(grads, model.decoder.parameters()):
        if g is None:
            assert p.grad is None or float(p.grad.abs().max()) == 0
            continue
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)
    assert rec["reward"] == pytest.approx(float(r.mean()), rel=1e-5)


def test_zero_advantage_gives_zero_gradient(monkeypatch):
    model = tiny_model(vocab_size=len(WORDS) + 4)
    obj = _bound(C.Config())
    monkeypatch.setattr(obj, "rewards", lambda toks, keys: torch.full((len(keys),), 0.7))
    loss, rec, grads, _ = _loss_and_grads(obj, model)
    assert rec["adv_std"] == 0.0 and float(loss) == 0.0
    assert all(g is None or float(g.abs().max()) == 0.0 for g in grads)


def test_greedy_baseline_and_hard_attention(monkeypatch):
    model = tiny_model("hard", vocab_size=len(WORDS) + 4)
    obj = _bound(C.Config(), samples=2, baseline="greedy")
    loss, rec, grads, _ = _loss_and_grads(obj, model)
    assert "greedy_cider" in rec and rec["baseline"] == pytest.approx(rec["greedy_cider"])
    att = [p.grad for p in model.decoder.attention.parameters()]
    assert any(g is not None and float(g.abs().max()) > 0 for g in att)  # the locations' term


def test_config_checks():
    with pytest.raises(C.ConfigError, match="scst.samples"):
        C.validate(C.replace(C.Config(), train={"objective": "scst"}, scst={"samples": 1}))
    with pytest.raises(C.ConfigError, match="train.objective"):
        C.validate(C.replace(C.Config(), train={"objective": "reinforce"}))


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory) -> Path:
    from showattend.data.shapes import generate_shapes

    root = tmp_path_factory.mktemp("shapes_scst")
    generate_shapes(root, n_train=32, n_val=8, n_test=8, seed=5, progress=False)
    return root


def _cfg(tmp: Path, data: Path, out: str, *extra: str) -> C.Config:
    p = tmp / f"{out}.toml"
    p.write_text(tiny_toml(tmp / out, data, n_train=32, n_eval=8, epochs=2, batch_size=8, beam=1,
                           train_extra="threads = 1\ndeterministic = true"))
    return C.load_config(p, list(extra))


def _state(path: Path):
    ck = load_checkpoint(path)
    return ck["model"], ck["train_state"]


def test_scst_run_from_a_cross_entropy_checkpoint_resumes_bit_identical(shapes_data, tmp_path,
                                                                        monkeypatch):
    import showattend.metrics
    import showattend.train.run_files as RF

    monkeypatch.setattr(RF, "plot_run", lambda *a, **k: None)
    monkeypatch.setattr(showattend.metrics, "_java_available", lambda: False)
    threads = torch.get_num_threads()
    try:
        fit(_cfg(tmp_path, shapes_data, "xe"), progress=False, evaluate_test=False)
        init = str(tmp_path / "xe" / "best.pt")
        sc = ("train.objective=scst", f"train.init={init!r}".replace("'", '"'),
              "train.val_metric=CIDEr", "train.log_every=1")
        fit(_cfg(tmp_path, shapes_data, "ref", *sc), progress=False, evaluate_test=False)
        log = [ln for ln in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()
               if '"train"' in ln]
        assert len(log) == 2 * 4  # an epoch visits each of the 32 images once: 4 batches of 8
        assert all('"greedy_cider"' in ln and '"reward"' in ln for ln in log)

        real_step = signal_at_step(monkeypatch, 6)  # epoch 2, batch 2 of 4
        cut = _cfg(tmp_path, shapes_data, "cut", *sc)
        assert fit(cut, progress=False, evaluate_test=False).interrupted
        monkeypatch.setattr(L, "train_step", real_step)
        fit(cut, resume=True, progress=False, evaluate_test=False)
        (m1, s1), (m2, s2) = _state(tmp_path / "cut" / "last.pt"), _state(tmp_path / "ref" / "last.pt")
        assert s1["step"] == s2["step"] == 8
        for k in m2:
            assert torch.equal(m1[k], m2[k]), k
        # the run started from the cross-entropy weights, not from scratch
        xe = load_checkpoint(tmp_path / "xe" / "best.pt")["model"]
        bad = _cfg(tmp_path, shapes_data, "bad", *sc, "encoder.grid=2")
        with pytest.raises(Exception, match="preprocessed differently|incompatible"):
            fit(bad, progress=False, evaluate_test=False)
        assert set(xe) == set(m2)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("kind", ["soft", "hard", "local", "glimpse_hard", "glimpse_stn"])
def test_samples_drawn_per_image_equal_samples_of_repeated_rows(kind):
    """The self-critical K samples per image (memory once per image) are the draws, and the
    replay the log-probabilities and maps, of the image's rows repeated K times."""
    from showattend.decoding import sample

    model = tiny_model(kind).eval()
    feats = model.encode(torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2)))
    rep = feats.repeat_interleave(4, 0)
    torch.manual_seed(5)
    a = sample(model, rep, 6)
    torch.manual_seed(5)
    b = sample(model, feats, 6, repeats=4)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths)
    caps = torch.cat([torch.full_like(a.tokens[:, :1], 1), a.tokens], 1)
    ra = model(None, caps, feats=rep, noise=a.noise)
    rb = model(None, caps, feats=feats, noise=b.noise, repeats=4)
    tol = dict(rtol=1e-5, atol=1e-6)  # same float32 products, possibly other GEMM blocking
    torch.testing.assert_close(rb.packed_logits, ra.packed_logits, **tol)
    torch.testing.assert_close(rb.alphas, ra.alphas, **tol)


def test_end_token_reward_scores_how_a_caption_ends():
    """scst.end_token: <end> is a word of samples and references, so of two captions with the
    same words the one that stops where the references stop scores higher; without it the two
    tie."""
    vocab = Vocab(["<pad>", "<start>", "<end>", "<unk>", *WORDS])

    def ids(text):
        return torch.tensor([[vocab.stoi[w] for w in text.split()] + [2]])

    done, cut = ids("a dog runs on the grass"), ids("the grass a dog runs on")
    toks = torch.cat([done, cut])
    plain = _bound(C.Config()).rewards(toks, [0, 0])
    ended = _bound(C.Config(), end_token=True).rewards(toks, [0, 0])
    assert float(ended[0]) > float(ended[1])
    assert float(plain[0]) > float(plain[1])  # word order already counts (bigrams) ...
    gap = lambda r: float(r[0] - r[1]) / float(r[0])  # noqa: E731
    assert gap(ended) > gap(plain)  # ... the ending adds "grass <end>" and "on <end>" misses
