"""The attention report without a browser: beam alternatives, the page's data, JSON export,
animations, references, the inspect command, and the serve endpoint."""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import showattend
from showattend.cli import main
from showattend.data.coco import DataFormatError
from showattend.decoding import beam_search
from showattend.report import Report, decode_maps, encode_maps, name_models, read_references
from showattend.visualize import upsample_attention

from conftest import tiny_model
from inspect_fixtures import soft_hard, test_images  # noqa: F401 - fixtures

ASSETS = Path(__file__).parent / "assets"


# ---------------------------------------------------------------------------- beams


@pytest.mark.parametrize("length_norm", [0.0, 0.7])
def test_keep_beams_returns_all_hypotheses_best_first(length_norm):
    from tolerances import STEP_K, fp32_rtol

    torch.manual_seed(0)
    model = tiny_model(vocab_size=12).eval()
    feats = model.encode(torch.randn(3, 3, 32, 32))
    best = beam_search(model, feats, beam=4, max_len=6, length_norm=length_norm)
    allb = beam_search(model, feats, beam=4, max_len=6, length_norm=length_norm, keep_beams=True)
    assert allb.tokens.shape[0] == 12
    for i in range(3):
        rows = slice(4 * i, 4 * i + 4)
        # the first kept beam is exactly the best hypothesis
        n = int(best.lengths[i])
        assert torch.equal(allb.tokens[4 * i, : n + 1], best.tokens[i, : n + 1])
        assert allb.scores[4 * i] == best.scores[i]
        torch.testing.assert_close(allb.alphas[4 * i, :n], best.alphas[i, :n])
        # ranked by the same criterion, best first, and all different sequences
        lens = allb.lengths[rows].float()
        ranked = allb.scores[rows] / (lens + 1) ** length_norm
        assert bool((ranked[:-1] >= ranked[1:]).all())
        seqs = {tuple(allb.tokens[r, : int(allb.lengths[r])].tolist())
                for r in range(4 * i, 4 * i + 4)}
        assert len(seqs) == 4
        # each hypothesis' score is its own log-probability: teacher-force it through the model
        for r in range(4 * i, 4 * i + 4):
            m = int(allb.lengths[r])
            # <start> w… <end>, teacher-forced
            cap = torch.cat([torch.tensor([1]), allb.tokens[r, : m + 1]]).unsqueeze(0)
            logits = model(torch.zeros(1), cap, mode="expectation", feats=feats[i: i + 1]).logits
            logp = torch.log_softmax(logits.float(), -1)[0]
            lp = logp[torch.arange(m + 1), cap[0, 1:]].sum()
            assert float(lp) == pytest.approx(float(allb.scores[r]), rel=fp32_rtol(6 * STEP_K))


def test_api_alternatives_match_plain_caption(soft_hard, test_images):
    _, soft, _ = soft_hard
    cap = showattend.load(soft, device="cpu")
    plain = cap.caption(test_images[:3], beam=3)
    alts = cap.caption(test_images[:3], beam=3, alternatives=True)
    for p, a in zip(plain, alts):
        assert a.words == p.words and a.score == pytest.approx(p.score)
        assert len(a.alternatives) == 3 and a.alternatives[0].words == a.words
        assert a.alternatives[0] is not a and not a.alternatives[0].alternatives
        assert [x.score for x in a.alternatives] == sorted((x.score for x in a.alternatives),
                                                           reverse=True)
        for x in a.alternatives:
            assert x.attention.shape == (len(x.words), 8, 8)
    assert plain[0].alternatives == []


# ---------------------------------------------------------------------------- encoding


def test_map_quantisation_roundtrip():
    rng = np.random.default_rng(0)
    a = rng.dirichlet(np.ones(49), size=5).reshape(5, 7, 7)
    a[2] = 0.0  # an all-zero map survives
    data, peaks = encode_maps(a)
    assert len(base64.b64decode(data)) == 5 * 49  # one byte per cell
    back = decode_maps(data, peaks, (7, 7))
    assert np.abs(back - a).max() <= max(peaks) / 510 + 1e-9
    assert peaks[2] == 0.0 and not back[2].any()
    # what the page draws (scaled to each map's maximum) barely changes
    for t in (0, 1, 3):
        ref = upsample_attention(a[t], (56, 56))
        assert np.abs(upsample_attention(back[t], (56, 56)) - ref).max() < 0.01


def test_small_images_pick_the_smaller_encoding():
    from showattend.report.build import image_data_uri

    flat = np.zeros((64, 64, 3), np.uint8)
    flat[10:30, 20:40] = (255, 0, 0)
    noisy = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    photo = np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8)
    assert image_data_uri(flat).startswith("data:image/png;")  # lossless where it is compact
    assert image_data_uri(noisy).startswith("data:image/jpeg;")
    assert image_data_uri(photo).startswith("data:image/jpeg;")
    small = image_data_uri(photo, max_side=150)
    with Image.open(io.BytesIO(base64.b64decode(small.split(",", 1)[1]))) as im:
        assert im.size == (150, 100)


def test_name_models(tmp_path):
    (tmp_path / "runs" / "soft").mkdir(parents=True)
    f = tmp_path / "runs" / "soft" / "best.pt"
    f.write_bytes(b"x")
    assert name_models([str(f), str(tmp_path / "runs" / "soft"), f"mine={f}"]) == {
        "soft": str(f), "soft_2": str(tmp_path / "runs" / "soft"), "mine": str(f)}


# ---------------------------------------------------------------------------- references


def test_read_references_every_format(tmp_path):
    coco = tmp_path / "captions.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "test/a.png"}],
                                "annotations": [{"image_id": 1, "id": 1, "caption": "A red dot"},
                                                {"image_id": 1, "id": 2, "caption": "a dot"}]}))
    assert read_references(coco) == {"a.png": ["A red dot", "a dot"]}
    karpathy = tmp_path / "dataset_flickr8k.json"
    karpathy.write_text(json.dumps({"images": [
        {"split": "test", "imgid": 0, "filename": "b.jpg", "sentences": [{"raw": "a dog"}]},
        {"split": "restval", "imgid": 1, "filename": "c.jpg",
         "sentences": [{"tokens": ["a", "cat"]}]}]}))
    assert read_references(karpathy) == {"b.jpg": ["a dog"], "c.jpg": ["a cat"]}
    token = tmp_path / "Flickr8k.token.txt"
    token.write_text("d.jpg#0\tA dog runs .\r\nd.jpg#1\tA dog .\n")
    assert read_references(token) == {"d.jpg": ["A dog runs .", "A dog ."]}
    plain = tmp_path / "refs.json"
    plain.write_text(json.dumps({"some/dir/e.jpg": ["a  cat", "one cat"]}))
    assert read_references(plain) == {"e.jpg": ["a cat", "one cat"]}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"e.jpg": "not a list"}))
    with pytest.raises(DataFormatError, match="bad.json.*list of caption strings"):
        read_references(bad)
    with pytest.raises(DataFormatError, match="no such file"):
        read_references(tmp_path / "missing.json")


# ---------------------------------------------------------------------------- the report


@pytest.fixture(scope="module")
def built(soft_hard, test_images):
    from showattend.report.references import read_references as rr

    data, soft, hard = soft_hard
    models = {"soft": showattend.load(soft, device="cpu"),
              "hard": showattend.load(hard, device="cpu")}
    refs = rr(data / "captions_test.json")
    return models, Report.build(models, test_images[:5], references=refs, beam=2)


def test_report_data_is_the_models_output(built, test_images):
    models, rep = built
    assert [m.name for m in rep.models] == ["soft", "hard"]
    assert rep.models[1].attention == "hard" and rep.models[1].mode == "argmax"
    page = rep.page_data()
    assert len(page["images"]) == 5
    for e, im, path in zip(rep.entries, page["images"], test_images):
        assert im["name"] == path.name and len(im["refs"]) >= 1
        # both models see the same 64×64 view: one embedded picture (PNG or JPEG, the smaller)
        assert len(im["views"]) == 1
        mime, b64 = im["views"][0].split(";base64,")
        pic = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), np.int16)
        view = e.captions[0].view.astype(np.int16)
        if mime == "data:image/png":
            assert np.array_equal(pic, view)
        else:
            assert mime == "data:image/jpeg" and np.abs(pic - view).mean() < 6
        for mi, (name, api) in enumerate(models.items()):
            [c] = api.caption([path], beam=2, alternatives=True)
            r = im["results"][mi]
            assert r["beams"][0]["words"] == c.words == e.captions[mi].words
            # the model's two beams, then each reference caption explained (marked)
            own = [b for b in r["beams"] if not b.get("explained")]
            told = [b for b in r["beams"] if b.get("explained")]
            assert len(own) == 2 and r["beams"][:2] == own
            assert [b["text"] for b in told] == im["refs"]
            assert all(len(b["logp"]) == len(b["words"]) for b in told)
            for b, alt in zip(r["beams"], c.alternatives):
                maps = decode_maps(b["maps"], b["peaks"], (8, 8))
                assert np.abs(maps - alt.attention).max() <= alt.attention.max() / 510 + 1e-6
                np.testing.assert_allclose(b["beta"], alt.beta, atol=1e-4)
                assert b["score"] == pytest.approx(alt.score, abs=1e-4)
            if name == "hard":
                assert r["beams"][0]["boxes"] == [[pytest.approx(v, abs=0.01) for v in box]
                                                  for box in c.boxes]
            else:
                assert r["beams"][0]["boxes"] is None
            assert set(r["scores"]) == {"BLEU-4", "CIDEr"}


def test_report_scores_equal_the_scorers(built):
    from showattend.metrics import caption_scores

    _, rep = built
    refs = {i: e.references for i, e in enumerate(rep.entries)}
    want = caption_scores({i: e.captions[0].caption for i, e in enumerate(rep.entries)}, refs)
    for i, e in enumerate(rep.entries):
        assert e.scores[0] == pytest.approx(want[i])
    # the mean per-caption CIDEr is the corpus CIDEr over the same images
    from showattend.metrics import caption_metrics

    corpus = caption_metrics({i: e.captions[0].caption for i, e in enumerate(rep.entries)}, refs,
                             meteor=False)
    assert np.mean([want[i]["CIDEr"] for i in want]) == pytest.approx(corpus["CIDEr"])


def test_report_html_is_self_contained(built, tmp_path):
    _, rep = built
    path = rep.save(tmp_path / "r.html")
    text = path.read_text("utf-8")
    # no network: nothing loaded from elsewhere, and the page's policy forbids it
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
    assert "default-src 'none'" in text and "<link" not in text
    assert "{{" not in text.split('id="report-data"')[0]  # every marker filled
    m = re.search(r'<script id="report-data" type="application/json">(.*?)</script>', text, re.S)
    data = json.loads(m.group(1))
    assert data == json.loads(json.dumps(rep.page_data()))
    assert path.stat().st_size < 200_000  # 5 images of 64×64 with 2 models × 2 beams


def test_report_json_export(built, tmp_path):
    _, rep = built
    rep.save_json(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert [m["name"] for m in data["models"]] == ["soft", "hard"]
    img = data["images"][0]
    c = rep.entries[0].captions[1]
    rec = img["results"]["hard"]
    assert rec["words"] == c.words and rec["caption"] == c.caption
    np.testing.assert_allclose(rec["attention"], c.attention, atol=1e-6)
    assert rec["boxes"] == [list(b) for b in c.boxes] and rec["locations"] == c.locations.tolist()
    # the two beams, then the reference caption explained (its text, log p per word)
    assert len(rec["alternatives"]) == 2 + len(img["references"])
    assert rec["alternatives"][0]["words"] == c.words and "logp" not in rec["alternatives"][0]
    assert [a["text"] for a in rec["alternatives"][2:]] == img["references"]
    assert set(rec["scores"]) == {"BLEU-4", "CIDEr"} and img["references"]


@pytest.mark.parametrize("fmt", ["gif", "apng"])
def test_animations_move_with_the_words(built, tmp_path, fmt):
    _, rep = built
    files = rep.save_animations(tmp_path / "anim", fmt=fmt)
    assert len(files) == 2 * len(rep.entries)
    c = rep.entries[0].captions[0]
    with Image.open(files[0]) as im:
        assert im.n_frames == len(c.words) + 1 and im.info.get("loop") == 0
        frames = []
        for k in range(im.n_frames):
            im.seek(k)
            frames.append(np.asarray(im.convert("RGB"), dtype=np.float64))
    scale = frames[0].shape[1] / 64  # frames are 256 wide; the view is 64×64
    # each word's frame is hottest (reddest minus bluest) where that word's map peaks
    for t in range(len(c.words)):
        a = c.attention[t]
        hi, lo = np.unravel_index(a.argmax(), a.shape), np.unravel_index(a.argmin(), a.shape)
        if a[hi] < 2 * a[lo]:
            continue  # a flat map has no place to be hot
        f = frames[t + 1] - frames[0]  # the overlay's contribution

        def redness(cell):
            y, x = (int((v + 0.5) * 8 * scale) for v in cell)
            return f[y, x, 0] - f[y, x, 2]
        assert redness(hi) > redness(lo)


def test_repr_html_is_an_isolated_page(built):
    _, rep = built
    c = rep.entries[0].captions[0]
    html = c._repr_html_()
    assert html.startswith("<iframe") and 'sandbox="allow-scripts"' in html
    assert "&lt;script id=&quot;report-data&quot;" in html  # the whole page, escaped in srcdoc
    assert rep._repr_html_().startswith("<iframe")


def test_caption_list_shows_itself_in_notebooks(built, test_images):
    import html as html_lib

    models, _ = built
    caps = models["hard"].caption(test_images[:2], beam=2, alternatives=True)
    assert isinstance(caps, list) and len(caps) == 2  # still the list it always was
    page = html_lib.unescape(caps._repr_html_())
    data = json.loads(re.search(r'id="report-data" type="application/json">(.*?)</script>',
                                page, re.S).group(1))
    assert data["models"][0] | {"name": None} == {
        "name": None, "attention": "hard", "grid": [8, 8], "window": 1, "beam": 2,
        "mode": "argmax", "checkpoint": ""}
    assert [im["results"][0]["beams"][0]["words"] for im in data["images"]] == [
        c.words for c in caps]


# ---------------------------------------------------------------------------- the commands


def test_cli_inspect_writes_everything(soft_hard, test_images, tmp_path, capsys):
    data, soft, hard = soft_hard
    bad = tmp_path / "imgs" / "broken.png"
    bad.parent.mkdir()
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    for p in test_images[:3]:
        (tmp_path / "imgs" / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "out" / "report.html"
    rc = main(["-q", "inspect", str(tmp_path / "imgs"), "--checkpoint", str(soft / "best.pt"),
               "--checkpoint", f"h={hard}", "--out", str(out), "--beam", "2", "--references",
               str(data / "captions_test.json"), "--json", str(tmp_path / "r.json"),
               "--animations", str(tmp_path / "anim"), "--animation-format", "apng"])
    cap = capsys.readouterr()
    assert rc == 1  # one image could not be read; the others are in the report
    assert "skipped: cannot read image" in cap.err and "broken.png" in cap.err
    assert "3 images x 2 models, 3 with references" in cap.out
    page = out.read_text("utf-8")
    assert "broken.png" in page  # listed on the page as unreadable
    assert len(list((tmp_path / "anim").glob("*.png"))) == 6
    js = json.loads((tmp_path / "r.json").read_text())
    assert [m["name"] for m in js["models"]] == ["run_soft", "h"]


def test_cli_inspect_errors_are_one_line(soft_hard, tmp_path, capsys):
    _, soft, _ = soft_hard
    bad_refs = tmp_path / "refs.json"
    bad_refs.write_text("{not json")
    img = tmp_path / "a.png"
    Image.new("RGB", (40, 40), "red").save(img)
    for argv, msg in [
        (["inspect", str(img), "--checkpoint", str(soft), "--references", str(bad_refs)],
         "refs.json: not a Flickr token file and not JSON"),
        (["inspect", str(tmp_path / "nothing.png"), "--checkpoint", str(soft), "--out",
          str(tmp_path / "r.html")], "no readable images"),
        (["inspect", str(img), "--checkpoint", str(tmp_path / "missing.pt")], "missing.pt"),
        (["inspect", str(img), "--checkpoint", str(soft), "--out", str(tmp_path)],
         "is a directory"),
        (["serve", "--checkpoint", str(soft), "--port", "70000"], "not a port number"),
    ]:
        assert main(["-q", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("showattend: error:") and msg in err[-1], err


# ---------------------------------------------------------------------------- serve (no browser)


@pytest.fixture(scope="module")
def server(built):
    from showattend.serve import Inspector, make_server

    models, _ = built
    inspector = Inspector(models, beam=2, max_upload=200_000)
    srv = make_server(inspector, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", inspector
    srv.shutdown()
    srv.server_close()
    inspector.close()


def _post(url: str, body: bytes, name: str, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/caption", data=body, method="POST",
                                 headers={"X-Filename": name, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_serve_captions_uploads_and_survives_bad_ones(server, test_images, monkeypatch):
    url, inspector = server
    # requests never load a model: the ones loaded at start serve every request
    from showattend.api import CaptionerAPI

    monkeypatch.setattr(CaptionerAPI, "load",
                        classmethod(lambda *a, **k: pytest.fail("model loaded per request")))
    with urllib.request.urlopen(url + "/", timeout=30) as r:
        page = r.read().decode()
    assert r.status == 200 and '"mode":"serve"' in page and '"max_upload":200000' in page

    status, body = _post(url, test_images[0].read_bytes(), test_images[0].name)
    assert status == 200
    im = body["image"]
    [c] = inspector.models["soft"].caption([test_images[0]], beam=2)
    assert im["name"] == test_images[0].name and im["results"][0]["beams"][0]["words"] == c.words
    assert len(im["results"]) == 2 and im["results"][1]["beams"][0]["boxes"]

    status, body = _post(url, b"this is text, not a picture\n", "notes.jpg")
    assert status == 415 and body["error"].startswith("notes.jpg is not an image this server")
    assert "/tmp" not in body["error"]  # our temporary file's name is not shown
    status, body = _post(url, b"\xff\xd8\xff" + b"\0" * 300_000, "huge.jpg")
    assert status == 413 and "this server takes images up to" in body["error"]
    status, body = _post(url, b"", "empty.png")
    assert status == 400 and "empty" in body["error"]
    status, body = _post(url, b"abc", "x.png", {"Host": "evil.example:80"})
    assert status == 403
    # still serving
    status, body = _post(url, test_images[1].read_bytes(), test_images[1].name)
    assert status == 200 and body["image"]["name"] == test_images[1].name
    assert inspector.served == 2
