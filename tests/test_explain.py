"""``explain``: a caption a person writes, teacher forced. Held to the two computations it must
agree with — the model's own greedy decoding (explaining its caption gives back its maps and
score) and the model's teacher-forced training pass (the maps of any text) — for soft, hard,
local, multi-head and ensemble models; and to its interface (unknown words, empty text, long
text, records, CLI). Planted once: maps shifted by one word against the text, the score without
<end>, the unknown words dropped from the record — each failed here.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_model
from showattend.api import CaptionerAPI
from showattend.config import Config
from showattend.data.images import Preprocessor
from showattend.explain import ExplainError, encode_text
from showattend.models.captioner import Captioner
from showattend.models.ensemble import EnsembleDecoder
from showattend.vocab import Vocab
from test_box_supervision import flickr_like  # noqa: F401  (fixture)
from tolerances import assert_close_fp32

WORDS = ("a red circle above a blue square left of a green triangle small big yellow "
         "purple below right").split()
VOCAB = Vocab.build([" ".join(WORDS)])


def _model(kind: str) -> Captioner:
    if kind == "ensemble":
        a, b = tiny_model("soft", vocab_size=len(VOCAB)), tiny_model("soft", vocab_size=len(VOCAB),
                                                                     seed=1)
        return Captioner(a.encoder, EnsembleDecoder([a.decoder, b.decoder])).eval()
    if kind == "heads":
        from showattend.models.encoder import build_encoder

        torch.manual_seed(0)
        enc = build_encoder("shapes_cnn", grid=4, channels=16, coords=True)
        return Captioner.build(enc, len(VOCAB), attention="soft", attn_dim=16, embed_dim=16,
                               hidden_dim=32, dropout=0.0, heads=2).eval()
    return tiny_model(kind, vocab_size=len(VOCAB), window=3 if kind == "hard" else 1).eval()


def _api(kind: str) -> CaptionerAPI:
    return CaptionerAPI(_model(kind), VOCAB, Preprocessor((32, 32), (0.5,) * 3, (0.25,) * 3),
                        Config(), torch.device("cpu"))


def _images(n: int = 6) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.mark.parametrize("kind", ["soft", "hard", "local", "heads", "ensemble"])
def test_explaining_the_greedy_caption_gives_back_its_maps_and_score(kind):
    api = _api(kind)
    imgs = _images()
    own = list(api.caption(imgs, beam=1))
    keep = [i for i, c in enumerate(own) if c.words]
    assert len(keep) >= 3
    ex = api.explain([imgs[i] for i in keep], [[own[i].caption] for i in keep], beam=1)
    L = api.model.grid[0] * api.model.grid[1]
    for i, e in zip(keep, ex):
        c = own[i]
        assert e.words == c.words
        # the same step function on the same rows: equal up to the step's own roundings
        assert_close_fp32(torch.from_numpy(e.attention), torch.from_numpy(c.attention), k=L * 16)
        assert_close_fp32(torch.tensor(e.score), torch.tensor(c.score), k=len(c.words) * L,
                          scale=float(np.abs(e.logp).sum()) + abs(e.end_logp))
        assert np.all(e.rank >= 1)
        assert e.model_caption == c.caption
        if c.boxes is not None:
            assert e.boxes == c.boxes
        if c.head_attention is not None:
            assert np.allclose(e.head_attention, c.head_attention, atol=1e-6)


@pytest.mark.parametrize("kind", ["soft", "hard", "local"])
def test_maps_of_any_text_equal_the_teacher_forced_training_pass(kind):
    """An independent computation: the model's own teacher-forced forward (the fast path the
    losses train with), in the mode explain decodes with, on the same tokens."""
    api = _api(kind)
    imgs = _images(3)
    texts = ["a red circle above a blue square", "small purple triangle right of a zebra", "a"]
    ex = api.explain(imgs, texts)
    assert len(ex) == 9  # image-major: image 0's three texts first
    batch = torch.stack([api.preprocess.normalize(api.preprocess.view(im)) for im in imgs])
    for r, e in enumerate(ex):
        t = encode_text(VOCAB, texts[r % 3])
        caps = torch.tensor([[1, *t.ids, 2]])
        with torch.no_grad():
            out = api.model(batch[r // 3: r // 3 + 1], caps, mode=api.model.test_mode)
            logp = torch.log_softmax(out.logits.float(), -1)[0]  # (n+1, V)
        n = len(t.words)
        ref = out.alphas[0, :n].reshape(n, *api.model.grid)
        assert_close_fp32(torch.from_numpy(e.attention), ref, k=256)
        want = logp[torch.arange(n + 1), caps[0, 1:]]
        assert_close_fp32(torch.from_numpy(e.logp), want[:n], k=256, scale=float(want.abs().max()))
        assert abs(e.end_logp - float(want[n])) < 1e-4 * (1 + abs(float(want[n])))
        assert abs(e.score - float(want.sum())) < 1e-4 * float(want.abs().sum())  # <end> in it
        # rank among the words the model can emit (not <pad> 0, <start> 1); top words as
        # decoding could choose them (<unk> 3 left out)
        for s_ in range(n):
            assert int(e.rank[s_]) == int((logp[s_, 2:] > want[s_]).sum()) + 1
            able = logp[s_].clone()
            able[[0, 1, 3]] = float("-inf")
            assert [w for w, _ in e.top[s_]] == [VOCAB.itos[i] for i in able.topk(3).indices]


def test_unknown_words_are_fed_as_unk_and_named():
    api = _api("soft")
    [e] = api.explain(_images(1), "a zebra above a red unicorn")
    assert e.words == ["a", "zebra", "above", "a", "red", "unicorn"]
    assert e.unknown == ["zebra", "unicorn"] and e.unknown_at == [1, 5]
    rec = e.to_json()
    assert rec["unknown"] == ["zebra", "unicorn"] and rec["words"][1] == "zebra"
    for key in ("text", "logp", "rank", "top", "end_logp", "model_caption", "model_score",
                "attention", "beta", "score"):
        assert key in rec
    assert len(rec["logp"]) == len(rec["attention"]) == len(rec["top"]) == 6


def test_text_longer_than_max_len_is_explained_in_full_and_empty_text_refused():
    api = _api("hard")
    long = " ".join(["a red circle above a blue square"] * 5)  # 35 words, max_len 20
    [e] = api.explain(_images(1), long)
    assert len(e.words) == 35 and e.attention.shape[0] == 35 and len(e.boxes) == 35
    with pytest.raises(ExplainError):
        api.explain(_images(1), " ,.; ")


def test_cli_explain(trained, tmp_path, capsys):
    from showattend.cli import main

    tmp, run = trained
    img = sorted((tmp / "data" / "images" / "test").glob("*.png"))[0]
    texts = tmp_path / "texts.txt"
    texts.write_text("a red circle\n\na qwertyuiop above a blue square\n")
    rc = main(["explain", str(img), "--checkpoint", str(run / "best.pt"), "--texts", str(texts),
               "--text", "a green triangle", "--json", "--overlay-dir", str(tmp_path / "ov")])
    out, err = capsys.readouterr()
    assert rc == 0
    recs = json.loads(out)
    assert [r["text"] for r in recs] == ["a green triangle", "a red circle",
                                         "a qwertyuiop above a blue square"]
    assert recs[2]["unknown"] == ["qwertyuiop"]
    assert "qwertyuiop" in err and "<unk>" in err
    assert len(list((tmp_path / "ov").glob("*.png"))) == 3
    # --references: every reference caption of the image, in the file's order
    refs = json.loads((tmp / "data" / "captions_test.json").read_text())
    iid = next(i["id"] for i in refs["images"] if i["file_name"].endswith(img.name))
    want = [a["caption"] for a in refs["annotations"] if a["image_id"] == iid]
    rc = main(["explain", str(img), "--checkpoint", str(run / "best.pt"), "--json",
               "--references", str(tmp / "data" / "captions_test.json")])
    out, err = capsys.readouterr()
    assert rc == 0 and [r["text"] for r in json.loads(out)] == want
    rc = main(["explain", str(img), "--checkpoint", str(run / "best.pt"), "--text", "!!"])
    out, err = capsys.readouterr()
    assert rc == 2 and "no word" in err and "Traceback" not in err
    assert err.count("\n") == 1
    rc = main(["explain", str(img), "--checkpoint", str(run / "best.pt")])
    out, err = capsys.readouterr()
    assert rc == 2 and "--text" in err


def test_evaluate_scores_the_reference_captions_teacher_forced(flickr_like, tmp_path, capsys):
    """evaluate --explain-references against an independent computation: every reference
    caption through the model's teacher-forced training pass, scored by the same measure."""
    from showattend.cli import main
    from showattend.config import load_config
    from showattend.data.splits import load_splits
    from showattend.evaluation import PhotoBoxes
    from showattend.loading import load_model
    from showattend.train import fit
    from test_box_supervision import FLICKR_TOML

    root, ents = flickr_like
    cfg_path = tmp_path / "f.toml"
    cfg_path.write_text(FLICKR_TOML.format(out=tmp_path / "run", root=root, ents=ents, weight=1.0))
    fit(load_config(cfg_path), progress=False, evaluate_test=False)
    ck = tmp_path / "run" / "best.pt"
    assert main(["-q", "evaluate", "--checkpoint", str(ck), "--entities", str(ents),
                 "--no-meteor", "--out", str(tmp_path / "ev"), "--explain-references"]) == 0
    out, err = capsys.readouterr()
    m = json.loads(out.strip().splitlines()[-1])
    assert "reference captions, teacher forced" in err
    model, vocab, pre, cfg, _ = load_model(ck, torch.device("cpu"))
    recs = load_splits(cfg.data, progress=False).test
    results = []
    for i, r in enumerate(recs):
        x = pre.normalize(pre.view(str(r.path))).unsqueeze(0)
        for c in r.captions:
            ids = vocab.encode(c, 10_000)
            if len(ids) == 2:
                continue
            with torch.no_grad():
                out = model(x, torch.tensor([ids]), mode=model.test_mode)
            n = len(ids) - 2
            words = encode_text(vocab, c).words
            results.append({"index": i, "image_id": r.image_id, "words": words,
                            "alphas": out.alphas[0, :n].reshape(n, *model.grid).numpy()})
    # map by map (an untrained model's maps differ little from word to word: the aggregate
    # alone would not see them shifted)
    from showattend.data.splits import make_source
    from showattend.explain import forced_references

    splits = load_splits(cfg.data, progress=False)
    src = make_source(cfg, splits, recs, pre, model, False, "test", False, "skip")
    got = forced_references(model, src, vocab, torch.device("cpu"))
    assert [g["words"] for g in got] == [r["words"] for r in results]
    for g, r in zip(got, results):
        assert_close_fp32(torch.from_numpy(g["alphas"]), torch.from_numpy(r["alphas"]), k=256)
    want = PhotoBoxes.load(ents, recs, pre).score(results)
    assert want["grounded_words"] > 0
    assert m["references/grounded_words"] == want["grounded_words"]
    for key in ("correctness", "pointing", "correctness_centre"):
        assert m[f"references/{key}"] == pytest.approx(want[key], abs=1e-4)
