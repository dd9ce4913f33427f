"""Ensembles: N decoders over one encoder decoding as one (models/ensemble.py, ensemble.py)."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from showattend.decoding import beam_search, greedy
from showattend.models.captioner import Captioner
from showattend.models.ensemble import EnsembleDecoder
from showattend.vocab import START_ID
from test_model import image_dependent_model
from tolerances import STEP_K, assert_close_fp32


def _pair():
    """Two different image-dependent tiny models, their ensemble and the annotations (6, 16, 18)."""
    a, feats = image_dependent_model("soft", seed=0)
    b, _ = image_dependent_model("soft", seed=1)
    ens = Captioner(a.encoder, EnsembleDecoder([a.decoder, b.decoder])).eval()
    return a, b, ens, feats


def _member_logps(model, feats, caps):
    """Teacher-forced log p(w_t | w_<t) (1, T, V) of one member for one caption."""
    with torch.no_grad():
        return torch.log_softmax(model(None, caps, feats=feats).logits[0].double(), -1)


def test_one_step_is_the_mean_of_the_members_distributions():
    a, b, ens, feats = _pair()
    prev = torch.full((6,), START_ID, dtype=torch.long)
    with torch.no_grad():
        outs = [m.decoder.step(m.memory(feats), m.decoder.init_state(feats), prev, "expectation")
                for m in (a, b)]
        got = ens.decoder.step(ens.memory(feats), ens.decoder.init_state(feats), prev, "expectation")
    p = sum(torch.softmax(o.logits.double(), -1) for o in outs) / 2  # (B, V) float64
    assert_close_fp32(got.logits.double().exp(), p, k=STEP_K)
    # already normalised: decoding's log-softmax leaves it as it is
    assert_close_fp32(torch.log_softmax(got.logits, -1), got.logits, k=STEP_K)
    assert_close_fp32(got.attn.alpha, (outs[0].attn.alpha + outs[1].attn.alpha) / 2, k=STEP_K)
    # the members disagree, so the mean is not one of them (the test can tell them apart)
    assert (torch.softmax(outs[0].logits, -1) - torch.softmax(outs[1].logits, -1)).abs().max() > 0.05


@pytest.mark.parametrize("beam", [1, 3])
def test_decoded_captions_score_as_the_members_mean(beam):
    """Each caption the ensemble decodes, re-scored by running the members one by one with
    teacher forcing and averaging their probabilities word by word, has the decoder's score and
    attention maps: catches a member's state or memory split, reordered or swapped."""
    a, b, ens, feats = _pair()
    out = beam_search(ens, feats, beam=beam, max_len=10) if beam > 1 else greedy(ens, feats, 10)
    assert len({tuple(t.tolist()) for t in out.tokens}) > 1  # the images get their own captions
    for i in range(6):
        n = int(out.lengths[i])
        caps = torch.cat([torch.tensor([START_ID]), out.tokens[i, : n + 1]])[None]
        f = feats[i: i + 1]
        logp = torch.logsumexp(torch.stack([_member_logps(m, f, caps) for m in (a, b)]), 0) \
            - torch.log(torch.tensor(2.0, dtype=torch.float64))
        score = logp.gather(1, caps[0, 1:].unsqueeze(1)).sum()
        assert_close_fp32(out.scores[i].double(), score, k=10 * STEP_K)
        with torch.no_grad():
            maps = (a(None, caps, feats=f).alphas[0] + b(None, caps, feats=f).alphas[0]) / 2
        assert_close_fp32(out.alphas[i, : n + 1], maps, k=10 * STEP_K)


def test_an_ensemble_of_copies_decodes_like_the_model():
    a, _, _, feats = _pair()
    twin = Captioner(a.encoder, EnsembleDecoder([a.decoder, copy.deepcopy(a.decoder)])).eval()
    for dec in (lambda m: beam_search(m, feats, beam=3, max_len=10),
                lambda m: greedy(m, feats, 10)):
        one, two = dec(a), dec(twin)
        assert torch.equal(one.tokens, two.tokens)
        assert_close_fp32(two.scores, one.scores, k=10 * STEP_K)


def test_members_must_be_alike():
    a, _, _, _ = _pair()
    with pytest.raises(ValueError, match="at least 2"):
        EnsembleDecoder([a.decoder])
    other, _ = image_dependent_model("soft", seed=1)
    other.decoder.vocab_size = 13
    with pytest.raises(ValueError, match="differ"):
        EnsembleDecoder([a.decoder, other.decoder])
    hard, _ = image_dependent_model("hard", seed=1)
    with pytest.raises(ValueError, match="deterministic"):
        EnsembleDecoder([hard.decoder, copy.deepcopy(hard.decoder)])


@pytest.fixture(scope="module")
def two_runs(trained, tmp_path_factory):
    """The session's tiny run and a second member: the same checkpoint with its decoder moved
    (as another seed would give; the tiny runs train their encoder, and members must share one
    encoder, as the frozen ImageNet encoder of the photo models is shared)."""
    tmp, run = trained
    other = tmp_path_factory.mktemp("seed1") / "run"
    other.mkdir()
    ck = torch.load(run / "best.pt", weights_only=True)
    g = torch.Generator().manual_seed(1)
    for k, v in ck["model"].items():
        if k.startswith("decoder.") and v.is_floating_point():
            v.add_(0.3 * v.std() * torch.randn(v.shape, generator=g) if v.numel() > 1 else 0.0)
    ck["config"]["train"]["seed"] = 1
    torch.save(ck, other / "best.pt")
    return tmp, run, other


def _evaluate(main, capsys, ck, out):
    assert main(["-q", "evaluate", "--checkpoint", str(ck), "--split", "test", "--beam", "2",
                 "--no-meteor", "--out", str(out)]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_joins_runs_into_one_checkpoint_that_evaluates(two_runs, tmp_path, capsys):
    from showattend.cli import main
    from showattend.loading import load_model

    tmp, run, other = two_runs
    out = tmp_path / "ens" / "best.pt"
    assert main(["-q", "ensemble", "--checkpoint", str(run), "--checkpoint", str(other),
                 "--out", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["members"] == [str(run / "best.pt"), str(other / "best.pt")]
    model, vocab, _, cfg, ck = load_model(out, device="cpu")
    assert cfg.decoder.ensemble == 2 and [m["seed"] for m in ck["ensemble"]] == [0, 1]
    for i, member in enumerate((run, other)):  # each member's weights, under its own name
        own = load_model(member, device="cpu")[0].decoder.state_dict()
        got = model.decoder.members[i].state_dict()
        assert own.keys() == got.keys() and all(torch.equal(own[k], got[k]) for k in own)
    m = _evaluate(main, capsys, out, tmp_path / "e")
    assert m["images"] > 0 and 0 <= m["BLEU-4"] <= 1
    # a run joined with itself decodes exactly as the run: the same captions, the same scores
    twin = tmp_path / "twin.pt"
    assert main(["-q", "ensemble", "--checkpoint", str(run), "--checkpoint", str(run),
                 "--out", str(twin)]) == 0
    capsys.readouterr()
    single, double = (_evaluate(main, capsys, ck, tmp_path / n)
                      for ck, n in ((run, "s"), (twin, "d")))
    assert single["BLEU-4"] == double["BLEU-4"] and single["CIDEr"] == double["CIDEr"]


def test_cli_refuses_what_cannot_decode_as_one(two_runs, tmp_path, capsys):
    from showattend.cli import main

    tmp, run, other = two_runs
    out = tmp_path / "ens.pt"

    def refused(argv, needle):
        assert main(["-q", *argv]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert not out.exists()

    refused(["ensemble", "--checkpoint", str(run), "--out", str(out)], "at least 2")
    ck = torch.load(other / "best.pt", weights_only=True)
    ck["vocab"]["words"] = list(ck["vocab"]["words"])[:-1] + ["zebra"]
    torch.save(ck, tmp_path / "renamed.pt")
    refused(["ensemble", "--checkpoint", str(run), "--checkpoint", str(tmp_path / "renamed.pt"),
             "--out", str(out)], "different vocabularies")
    ck = torch.load(other / "best.pt", weights_only=True)
    ck["config"]["decoder"]["hidden_dim"] = 64
    torch.save(ck, tmp_path / "wider.pt")
    refused(["ensemble", "--checkpoint", str(run), "--checkpoint", str(tmp_path / "wider.pt"),
             "--out", str(out)], "differ in decoder.hidden_dim")
    ck = torch.load(other / "best.pt", weights_only=True)
    next(v for k, v in ck["model"].items() if k.startswith("encoder.")).mul_(1.01)
    torch.save(ck, tmp_path / "tuned.pt")
    refused(["ensemble", "--checkpoint", str(run), "--checkpoint", str(tmp_path / "tuned.pt"),
             "--out", str(out)], "different encoder weights")
    refused(["ensemble", "--checkpoint", str(run), "--checkpoint", str(tmp_path / "nope.pt"),
             "--out", str(out)], "not found")
    refused(["train", "--config", str(tmp / "tiny_soft.toml"), "decoder.ensemble=2",
             f"out_dir={json.dumps(str(tmp_path / 'r'))}"], "share one frozen encoder")


# ------------------------------------------------------------- training an ensemble from a config


@pytest.fixture(scope="module")
def frozen_cache(tmp_path_factory):
    """(config path) of the Flickr fixture prepared with a frozen resnet50: a feature cache, so
    runs of any seed share the encoder that computed it."""
    from prep_fixtures import make_flickr, prepared_toml
    from showattend.config import load_config
    from showattend.data.prepare import prepare

    tmp = tmp_path_factory.mktemp("frozen")
    fx = make_flickr(tmp / "flickr")
    path = prepared_toml(tmp / "base.toml", fx, tmp / "prep", tmp / "unused",
                         backbone="resnet50", grid=2, coords=False)
    prepare(load_config(path), workers=1, progress=False)
    return path


def _decoders(ck, prefix="decoder."):
    return {k[len(prefix):]: v for k, v in ck["model"].items() if k.startswith(prefix)}


def test_train_builds_the_ensemble_of_a_config_and_resumes_it(frozen_cache, tmp_path, capsys):
    """`train` with decoder.ensemble = 2: members with seeds s, s + 1 in out/member<i>, joined
    into out/best.pt and tested; --resume leaves a finished member alone and retrains a lost
    one exactly (same seed, same data order)."""
    from showattend.cli import main
    from showattend.loading import load_model

    out = tmp_path / "ens"
    argv = ["-q", "train", "--config", str(frozen_cache), f"out_dir={json.dumps(str(out))}",
            "decoder.ensemble=2", "train.seed=3"]
    assert main([*argv[:2], "--resume", *argv[2:]]) != 0  # nothing to resume yet: one line
    err = capsys.readouterr().err
    assert "--resume: no member checkpoint" in err and len(err.strip().splitlines()) == 1
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 2  # the ensemble's test evaluation
    assert (out / "metrics_test_beam2.json").is_file()
    _, _, _, cfg, ck = load_model(out / "best.pt", device="cpu")
    assert cfg.decoder.ensemble == 2 and [m["seed"] for m in ck["ensemble"]] == [3, 4]
    members = [torch.load(out / f"member{i}" / "best.pt", weights_only=True) for i in (0, 1)]
    for i, m in enumerate(members):
        assert m["config"]["train"]["seed"] == 3 + i and m["config"]["decoder"]["ensemble"] == 1
        got, own = _decoders(ck, f"decoder.members.{i}."), _decoders(m)
        assert got.keys() == own.keys() and all(torch.equal(got[k], own[k]) for k in own)
    a, b = (_decoders(m) for m in members)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # two seeds, two decoders
    first = _decoders(ck)

    done = (out / "member0" / "last.pt").read_bytes()
    shutil.rmtree(out / "member1")
    assert main([*argv[:2], "--resume", *argv[2:]]) == 0
    capsys.readouterr()
    assert (out / "member0" / "last.pt").read_bytes() == done  # finished: not trained again
    again = _decoders(torch.load(out / "best.pt", weights_only=True))
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)
    # fine-tuning starts from one member, not from the joined file: refused in one line
    assert main(["-q", "train", "--config", str(frozen_cache), "--init", str(out / "best.pt"),
                 f"out_dir={json.dumps(str(tmp_path / 'ft'))}"]) != 0
    err = capsys.readouterr().err
    assert "is an ensemble of 2 decoders" in err and len(err.strip().splitlines()) == 1


def test_train_refuses_an_ensemble_of_trained_encoders(tmp_path, capsys):
    """Members that train their own encoder could never decode as one: refused before any
    training, in one line."""
    from conftest import write_config
    from showattend.cli import main

    cfg = write_config(tmp_path)
    out = tmp_path / "r"
    assert main(["-q", "train", "--config", str(cfg), "decoder.ensemble=2",
                 f"out_dir={json.dumps(str(out))}"]) == 2
    err = capsys.readouterr().err
    assert "share one frozen encoder" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_members_trained_side_by_side_are_the_members_trained_in_turn(frozen_cache, tmp_path,
                                                                     capsys):
    """train.member_jobs = 2: both members at once, each in its own process with one of the two
    threads, give the members (and the joined file) of the same config trained one after the
    other at one thread; a member that fails there is reported in one line naming it."""
    from showattend.cli import main

    def train(out, *extra):
        return main(["-q", "train", "--config", str(frozen_cache),
                     f"out_dir={json.dumps(str(out))}", "decoder.ensemble=2", *extra])

    assert train(tmp_path / "seq", "train.threads=1") == 0
    assert train(tmp_path / "par", "train.threads=2", "train.member_jobs=2") == 0
    capsys.readouterr()
    for name in ("member0/best.pt", "member1/best.pt", "best.pt"):
        a, b = (_decoders(torch.load(tmp_path / d / name, weights_only=True))
                for d in ("seq", "par"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    par = torch.load(tmp_path / "par" / "member1" / "best.pt", weights_only=True)
    assert par["config"]["train"]["threads"] == 1  # the two threads were split

    (tmp_path / "par" / "member1" / "last.pt").write_bytes(b"not a checkpoint")
    assert train(tmp_path / "par", "train.threads=2", "train.member_jobs=2", "--resume") != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "member1" in err[0] and "Traceback" not in err[0], err


def test_snapshots_join_each_members_best_epoch_with_the_epochs_before_it(frozen_cache, tmp_path,
                                                                        capsys, monkeypatch):
    """train.snapshots = 2: each member keeps epoch<k>.pt (the model alone), drops those no
    snapshot ensemble can use (more than one epoch before its best), and the joined best.pt is
    each member's best epoch followed by the epoch before it, weights as they were then."""
    import importlib

    from showattend.cli import main

    fit_module = importlib.import_module("showattend.train.fit")  # the module, not the function

    # the fixture's captions are too few for the dev score to move: it rises every epoch here,
    # so the best epoch is the last and a snapshot before it exists
    monkeypatch.setattr(fit_module, "validate", lambda run, progress: {
        "BLEU-4": float(run.state.epoch + 1)})

    out = tmp_path / "snap"
    assert main(["-q", "train", "--config", str(frozen_cache), f"out_dir={json.dumps(str(out))}",
                 "decoder.ensemble=2", "train.snapshots=2", "train.epochs=3",
                 "train.early_stop=0", "train.lr_schedule=\"cosine\""]) == 0
    capsys.readouterr()
    ck = torch.load(out / "best.pt", weights_only=True)
    want, snaps = [], 0
    for i in (0, 1):
        m = out / f"member{i}"
        best = torch.load(m / "best.pt", weights_only=True)
        b = best["train_state"]["best_epoch"]
        kept = sorted(int(p.stem[5:]) for p in m.glob("epoch*.pt"))
        assert kept == [k for k in (1, 2, 3) if k >= b - 1], (b, kept)
        snap = torch.load(m / f"epoch{b}.pt", weights_only=True)
        assert "optimizer" not in snap and snap["train_state"]["epoch"] == b
        assert all(torch.equal(v, best["model"][k]) for k, v in snap["model"].items())
        want += [best] + ([torch.load(m / f"epoch{b - 1}.pt", weights_only=True)] if b > 1 else [])
        snaps += b > 1
    assert snaps > 0  # the run must exercise a snapshot (else this test could not fail)
    assert len(ck["ensemble"]) == len(want) == ck["config"]["decoder"]["ensemble"]
    for j, w in enumerate(want):
        got, own = _decoders(ck, f"decoder.members.{j}."), _decoders(w)
        assert got.keys() == own.keys() and all(torch.equal(got[k], own[k]) for k in own), j
