"""Reference boxes (Flickr30k Entities) in the report and the overlays: the page's data carries
each named word's boxes and correctness (and nothing for other words), the grounding summary
that "worst grounding first" sorts by, the dashed boxes on the overlays, and ``inspect`` /
``caption --entities`` end to end on a small trained model."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from inspect_fixtures import soft_hard, test_images  # noqa: F401 - fixtures
from test_box_supervision import _entities, _xml

from showattend.api import Caption
from showattend.attention_grounding import fold_plural, photo_targets, word_scores
from showattend.cli import main
from showattend.data.entities import EntitiesError, parse_annotation, parse_sentences
from showattend.data.images import Preprocessor
from showattend.reference_boxes import per_word, photos_for_images
from showattend.report import Report
from showattend.visualize import REF_BOX_GID, attention_figure


# ---------------------------------------------------------------------------- hand-made data


def _photo(pid: str, w: int, h: int, boxes: dict[str, tuple[int, int, int, int]], text: str):
    return parse_annotation(_xml(w, h, boxes).encode(), pid, parse_sentences(text.encode()))


# Photo 1234: 80×80; a dog in the left half, a man in the top-right quarter; "grass" has no box.
DOG_MAN = _photo("1234", 80, 80, {"1": (1, 1, 40, 80), "3": (41, 1, 80, 40)},
                 "[/EN#1/animals A dog] runs to [/EN#3/people a man] on [/EN#2/scene the grass] .\n")
# Photo 9999: a cat, which no caption below mentions.
CAT = _photo("9999", 80, 80, {"1": (1, 1, 80, 80)}, "[/EN#1/animals A cat] sleeps .\n")


def _caption(path: str, words: list[str], maps: list[list[list[float]]],
             alternatives: tuple = ()) -> Caption:
    a = np.asarray(maps, dtype=np.float64)  # (T, 2, 2)
    c = Caption(image=path, caption=" ".join(words), words=words, score=-1.0 * len(words),
                attention=a, beta=np.full(len(words), 0.5), locations=a.reshape(len(a), -1)
                .argmax(1), boxes=None, view=np.zeros((40, 40, 3), np.uint8))
    if alternatives:
        c.alternatives = [Caption(**{**c.__dict__, "alternatives": []}), *alternatives]
    return c


FLAT = [[0.25, 0.25], [0.25, 0.25]]
LEFT = [[0.5, 0.1], [0.3, 0.1]]  # 0.8 on the left half
TOP_RIGHT = [[0.1, 0.3], [0.2, 0.4]]  # 0.3 on the top-right quarter, peak outside


@pytest.fixture
def hand_report() -> Report:
    men = _caption("/photos/1234_x.png", ["the", "men"], [FLAT, TOP_RIGHT])
    caps = [
        _caption("/photos/1234_x.png", ["a", "dog", "near", "a", "man"],
                 [FLAT, LEFT, FLAT, FLAT, TOP_RIGHT], alternatives=(men,)),
        _caption("/photos/5678_y.png", ["a", "dog"], [FLAT, LEFT]),  # no annotations
        _caption("/photos/9999_z.png", ["a", "dog"], [FLAT, LEFT]),  # annotated, no named word
    ]
    return Report.from_captions({"m": caps},
                                entities={"1234_x.png": DOG_MAN, "/photos/9999_z.png": CAT})


def test_page_data_carries_boxes_and_correctness_of_named_words_only(hand_report):
    page = json.loads(json.dumps(hand_report.page_data()))
    assert page["version"] == 1 and "grounding" not in page["models"][0]
    first, plain, cat = page["images"]
    assert first["entities"] == "1234" and cat["entities"] == "9999"
    assert "entities" not in plain  # an image without annotations carries no new field at all
    assert "grounding" not in plain["results"][0]
    assert "grounding" not in plain["results"][0]["beams"][0]

    beam0 = first["results"][0]["beams"][0]["grounding"]
    assert [g is not None for g in beam0] == [False, True, False, False, True]
    dog, man = beam0[1], beam0[4]
    # the 80×80 photo stretched onto the 40×40 view: 1-based (1, 1, 40, 80) → (0, 0, 20, 40)
    assert dog["boxes"] == [[0.0, 0.0, 20.0, 40.0]] and dog["noun"] == "dog"
    assert dog["types"] == ["animals"] and dog["correctness"] == pytest.approx(0.8)
    assert dog["pointing"] is True and dog["uniform"] == pytest.approx(0.5)
    assert man["boxes"] == [[20.0, 0.0, 40.0, 20.0]] and man["correctness"] == pytest.approx(0.3)
    assert man["pointing"] is False and man["uniform"] == pytest.approx(0.25)
    # every beam has its own words: "men" names the man of the photo
    beam1 = first["results"][0]["beams"][1]["grounding"]
    assert beam1[0] is None and beam1[1]["noun"] == "man"
    assert beam1[1]["correctness"] == pytest.approx(0.3)
    # the same figures as the measure the evaluation reports
    [c] = [e.captions[0] for e in hand_report.entries[:1]]
    pre = Preprocessor(size=(40, 40), mean=(0.0,) * 3, std=(1.0,) * 3)
    ref = word_scores([c.words], [c.attention], [DOG_MAN], pre)
    assert [(s.index, s.correctness) for s in ref] == [(1, pytest.approx(0.8)),
                                                       (4, pytest.approx(0.3))]
    assert cat["results"][0]["beams"][0]["grounding"] == [None, None]


def test_grounding_summary_is_what_worst_grounding_sorts_by(hand_report):
    page = hand_report.page_data()
    summaries = [im["results"][0].get("grounding") for im in page["images"]]
    assert summaries[0] == {"words": 2, "correctness": pytest.approx(0.55),
                            "pointing": pytest.approx(0.5)}
    assert summaries[1] is None  # no annotations
    assert summaries[2] == {"words": 0, "correctness": None, "pointing": None}
    # the page's sort: the menu offers it, and its key is the mean (script text checked here;
    # the browser test runs it)
    js = hand_report.html()
    assert "worst grounding first" in js
    assert re.search(r'what === "grounding"\) return r\.grounding && r\.grounding\.words \? '
                     r'r\.grounding\.correctness : Infinity', js)


def test_json_export_has_full_precision_grounding(hand_report, tmp_path):
    data = json.loads(hand_report.save_json(tmp_path / "r.json").read_text())
    rec = data["images"][0]["results"]["m"]
    assert data["images"][0]["entities"] == "1234" and "entities" not in data["images"][1]
    assert [g is not None for g in rec["grounding"]] == [False, True, False, False, True]
    assert rec["grounding"][1]["entropy"] > 0 and rec["grounding_summary"]["words"] == 2
    assert rec["alternatives"][1]["grounding"][1]["noun"] == "man"
    assert "grounding" not in data["images"][1]["results"]["m"]


def test_photos_for_images_matches_by_flickr_id(tmp_path):
    ents = _entities(tmp_path / "ents", {"1234": (_xml(80, 80, {"1": (1, 1, 40, 80)}),
                                                  "[/EN#1/animals A dog] runs .\n")})
    got = photos_for_images(ents, ["a/1234_x.jpg", "b/1234.png", "5678_y.jpg", "holiday.jpg"])
    assert sorted(got) == ["a/1234_x.jpg", "b/1234.png"] and got["b/1234.png"].width == 80
    assert photos_for_images(ents, ["holiday.jpg"]) == {}
    with pytest.raises(EntitiesError, match="Annotations"):
        photos_for_images(tmp_path, ["1234_x.jpg"])  # not the Entities layout


# ---------------------------------------------------------------------------- overlays


def _ref_patches(ax) -> int:
    return sum(1 for p in ax.patches if p.get_gid() == REF_BOX_GID)


def test_overlay_draws_each_words_reference_boxes(hand_report):
    c = hand_report.entries[0].captions[0]
    scores = hand_report.entries[0].grounding[0][0]
    refs, correct = per_word(scores, len(c.words))
    assert correct == [None, pytest.approx(0.8), None, None, pytest.approx(0.3)]
    fig = attention_figure(c.view, c.words, c.attention, c.beta, ref_boxes=refs,
                           ref_scores=correct)
    axes = fig.axes  # the image, then one panel per word
    assert [_ref_patches(ax) for ax in axes] == [0, 0, 1, 0, 0, 1]
    box = next(p for p in axes[2].patches if p.get_gid() == REF_BOX_GID)
    assert (box.get_x(), box.get_y(), box.get_width(), box.get_height()) == (0, 0, 20, 40)
    assert box.get_linestyle() not in ("-", "solid")  # dashed, unlike the crop box
    assert "correctness 0.80" in axes[2].get_title() and "correctness" not in axes[1].get_title()
    assert "reference boxes (Flickr30k Entities)" in [t.get_text() for t in
                                                     axes[0].get_legend().get_texts()]
    plain = attention_figure(c.view, c.words, c.attention, c.beta)
    assert sum(_ref_patches(ax) for ax in plain.axes) == 0 and plain.axes[0].get_legend() is None
    with pytest.raises(ValueError, match="reference"):
        attention_figure(c.view, c.words, c.attention, ref_boxes=refs[:2])


# ---------------------------------------------------------------------------- the commands


@pytest.fixture(scope="module")
def flickr_named(soft_hard, test_images, tmp_path_factory):
    """Six test images of the soft run copied as ``<flickr id>_s.png`` (five annotated: every
    object a boxed phrase named by its shape) and their Entities folder."""
    data, _, _ = soft_hard
    tmp = tmp_path_factory.mktemp("flickr_named")
    caps = json.loads((data / "captions_test.json").read_text())
    objs = {im["id"]: im["objects"]
            for im in json.loads((data / "objects_test.json").read_text())["images"]}
    by_file = {Path(im["file_name"]).name: im["id"] for im in caps["images"]}
    photos, imgs = {}, tmp / "imgs"
    imgs.mkdir()
    for k, path in enumerate(test_images[:6]):
        fid = str(2001 + k)
        shutil.copy(path, imgs / f"{fid}_s.png")
        if k == 5:
            continue  # named like a Flickr photo, but not annotated
        objects = objs[by_file[path.name]]
        boxes = {str(n + 1): (o["bbox"][0] + 1, o["bbox"][1] + 1, o["bbox"][0] + o["bbox"][2],
                              o["bbox"][1] + o["bbox"][3]) for n, o in enumerate(objects)}
        text = " and ".join(f"[/EN#{n + 1}/other a {o['colour']} {o['shape']}]"
                            for n, o in enumerate(objects)) + " .\n"
        photos[fid] = (_xml(64, 64, boxes), text)
    return imgs, _entities(tmp / "entities", photos)


def test_cli_inspect_with_entities(soft_hard, flickr_named, tmp_path, capsys):
    _, soft, _ = soft_hard
    imgs, ents = flickr_named
    out = tmp_path / "report.html"
    assert main(["-q", "inspect", str(imgs), "--checkpoint", f"soft={soft}", "--out", str(out),
                 "--beam", "2", "--entities", str(ents), "--json", str(tmp_path / "r.json")]) == 0
    assert "6 images x 1 models, 5 with reference boxes" in capsys.readouterr().out
    page = json.loads(re.search(r'<script id="report-data" type="application/json">(.*?)'
                                r'</script>', out.read_text("utf-8"), re.DOTALL).group(1))
    data = json.loads((tmp_path / "r.json").read_text())
    import showattend

    pre = showattend.load(soft, device="cpu").preprocess
    named = 0
    for im, rec in zip(page["images"], data["images"]):
        if im["name"] == "2006_s.png":
            assert "entities" not in im and "grounding" not in im["results"][0]
            continue
        r = rec["results"]["soft"]
        photo = photos_for_images(ents, [rec["image"]])[rec["image"]]
        want = word_scores([r["words"]], [np.asarray(r["attention"])], [photo], pre)
        per = {s.index: s for s in want}
        beam0 = im["results"][0]["beams"][0]
        assert len(beam0["grounding"]) == len(beam0["words"])
        for t, g in enumerate(beam0["grounding"]):
            if t not in per:
                assert g is None, (beam0["words"][t], g)
                continue
            named += 1
            assert beam0["words"][t] in ("circle", "square", "triangle", "diamond")
            assert g["boxes"] == [[round(v, 2) for v in b] for b in per[t].boxes]
            # the page's maps are the JSON's attention: the same correctness
            assert g["correctness"] == pytest.approx(per[t].correctness, abs=1e-4)
        summary = im["results"][0]["grounding"]
        assert summary["words"] == len(per)
        if per:
            assert summary["correctness"] == pytest.approx(
                np.mean([s.correctness for s in want]), abs=1e-6)
    # some words name a shape of their photo (a shape the photo lacks is not scored: None)
    assert named >= 2


def test_cli_caption_overlays_draw_reference_boxes(soft_hard, flickr_named, tmp_path,
                                                   monkeypatch, capsys):
    import showattend.visualize as V

    _, soft, _ = soft_hard
    imgs, ents = flickr_named
    figs = []
    real_save = V.save_attention_figure

    def keep(fig, path):
        figs.append((Path(path).name, [(_ref_patches(ax), ax.get_title()) for ax in fig.axes]))
        real_save(fig, path)

    monkeypatch.setattr(V, "save_attention_figure", keep)
    assert main(["-q", "caption", str(imgs / "2001_s.png"), str(imgs / "2006_s.png"),
                 "--checkpoint", str(soft), "--overlay-dir", str(tmp_path / "ov"),
                 "--entities", str(ents)]) == 0
    captions = dict(line.split("\t") for line in capsys.readouterr().out.strip().splitlines())
    assert sorted(p.name for p in (tmp_path / "ov").iterdir()) == ["2001_s.png", "2006_s.png"]
    panels = dict(figs)
    words = captions[str(imgs / "2001_s.png")].split()
    # the photo's boxed things, by the measure's rule (a shape the photo lacks has no box)
    photo = photos_for_images(ents, [imgs / "2001_s.png"])[str(imgs / "2001_s.png")]
    shapes = [t for t, w in enumerate(words) if fold_plural(w) in photo_targets(photo)]
    assert shapes  # the caption names a shape of its photo
    for t, (n_refs, title) in enumerate(panels["2001_s.png"][1:]):
        assert (n_refs > 0) == (t in shapes) == ("correctness" in title), (words[t], title)
    assert all(n == 0 for n, _ in panels["2006_s.png"])  # not annotated: plain overlay
    # --entities without overlays is a one-line error; so is a source that is not Entities
    one = ["-q", "caption", str(imgs / "2001_s.png"), "--checkpoint", str(soft)]
    assert main([*one, "--entities", str(ents)]) == 2
    assert "give --overlay-dir" in capsys.readouterr().err
    assert main([*one, "--entities", str(imgs), "--overlay-dir", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("showattend: error:") and "Annotations" in err[0]
