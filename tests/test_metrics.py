"""COCO caption metrics against pycocoevalcap itself, results files, grounding and diagnostics."""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from showattend import metrics
from showattend.metrics import (
    caption_metrics,
    diagnostics,
    grounding,
    read_coco_results,
    simple_tokenize,
    write_coco_results,
)

HAS_JAVA = shutil.which("java") is not None
needs_java = pytest.mark.skipif(not HAS_JAVA, reason="needs a Java runtime")

# Six images with raw (untokenised) references and hypotheses: mixed case, punctuation,
# clitics, a partial match, an exact match and a miss, so every scorer has work to do.
REFERENCES = {
    1: ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave!",
        "Man on a surfboard riding an ocean wave."],
    2: ["Two dogs play in the grass.", "Two brown dogs running on a lawn."],
    3: ["A woman's hand holding a cell-phone.", "Someone holds a phone, close up."],
    4: ["A plate of food with broccoli and rice.", "A dinner plate with rice, broccoli and meat."],
    5: ["a small red circle above a large blue square"],
    6: ["A train on the tracks at a station.", "A red train pulls into the station."],
}
RESULTS = {
    1: "A man riding a wave on a surfboard.",
    2: "Two dogs playing in the grass",
    3: "A hand holding a phone.",
    4: "A plate of food with rice and broccoli.",
    5: "a small red circle above a large blue square",
    6: "A bus parked on a street.",
}
KEYS_NO_METEOR = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"]


@pytest.fixture
def no_java(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend java is not on PATH, and forget earlier warn-once state."""
    real_which = shutil.which

    def which(cmd: str, *args, **kwargs):
        return None if cmd == "java" else real_which(cmd, *args, **kwargs)

    monkeypatch.setattr(shutil, "which", which)
    monkeypatch.setattr(metrics, "_WARNED", set())


def _child_pids() -> set[int]:
    """Live children of this process (Linux /proc), to catch leaked Java processes."""
    me, children = os.getpid(), set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process exited while we looked
            continue
        # Field 2 (comm) is parenthesised and may contain spaces; state and ppid follow it.
        fields = text[text.rindex(")") + 2:].split()
        if int(fields[1]) == me and fields[0] != "Z":
            children.add(int(stat.parent.name))
    return children


def _direct_scores(references: dict, results: dict, meteor: object = None) -> dict[str, float]:
    """The same metrics computed by calling pycocoevalcap's tokenizer and scorers by hand.

    ``meteor``: a started pycocoevalcap Meteor scorer to use and shut down, or None for none.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in refs] for i, refs in references.items()})
    res = tokenizer.tokenize({i: [{"caption": c}] for i, c in results.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"BLEU-{n + 1}": b for n, b in enumerate(bleu)}
    if meteor is not None:
        try:
            out["METEOR"] = meteor.compute_score(gts, res)[0]
        finally:
            meteor.__del__()  # pycocoevalcap's own shutdown: kill and reap the JVM
    out["ROUGE-L"] = Rouge().compute_score(gts, res)[0]
    out["CIDEr"] = Cider().compute_score(gts, res)[0]
    return out


# ---------------------------------------------------------------------------- caption metrics


@pytest.mark.java
@needs_java
def test_caption_metrics_equal_pycocoevalcap_scorers_and_leave_no_process() -> None:
    from pycocoevalcap.meteor.meteor import Meteor

    # Start the reference METEOR JVM first: it loads (~10 s) while caption_metrics runs its own.
    reference_meteor = Meteor()
    before = _child_pids()
    got = caption_metrics(RESULTS, REFERENCES)
    assert _child_pids() - before == set(), "a Java process outlived caption_metrics"
    expected = _direct_scores(REFERENCES, RESULTS, meteor=reference_meteor)
    assert list(got) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]
    for key, value in expected.items():
        assert isinstance(got[key], float)
        assert got[key] == pytest.approx(value, abs=1e-9, rel=0), key
    # Not trivially equal: a realistic spread of values.
    assert 0.2 < got["BLEU-4"] < 0.9 and 0.1 < got["METEOR"] < 0.9 and got["CIDEr"] > 0.5


@pytest.mark.java
@needs_java
def test_fallback_tokenizer_scores_like_java_on_ordinary_captions(no_java: None) -> None:
    expected = _direct_scores(REFERENCES, RESULTS)
    with pytest.warns(RuntimeWarning, match="Java not found"):
        got = caption_metrics(RESULTS, REFERENCES)
    assert list(got) == KEYS_NO_METEOR
    for key in KEYS_NO_METEOR:
        assert got[key] == pytest.approx(expected[key], abs=1e-9, rel=0), key


@pytest.mark.java
@needs_java
def test_simple_tokenize_agrees_with_ptbtokenizer() -> None:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    captions = [
        "A man's dog, running!", "Don't STOP (now) [really]", 'He said "hi" to e-mail -- ok...',
        "won't can't I'm they're we've", "“hello” ‘world’ it’s", "3,000 1/2 tea-cup at 5:30",
        "A woman's hand holding a cell-phone, with a 3-D screen.", "cats' toys; U.S.A. $5 50%",
        "Two dogs play in the grass .", "", "...",
    ]
    java = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    for i, caption in enumerate(captions):
        assert simple_tokenize(caption) == java[i][0], caption


def test_simple_tokenize_known_outputs() -> None:
    assert simple_tokenize("A man's dog, running!") == "a man 's dog running"
    assert simple_tokenize("Don't stop -- ever...") == "do n't stop ever"
    assert simple_tokenize("a SMALL red circle") == "a small red circle"
    assert simple_tokenize("...") == ""


def _backend_params():
    return [
        pytest.param(True, marks=[pytest.mark.java, needs_java], id="java"),
        pytest.param(False, id="no-java"),
    ]


@pytest.mark.parametrize("java", _backend_params())
def test_identical_and_disjoint_captions(java: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not java:
        monkeypatch.setattr(metrics, "_java_available", lambda: False)
        monkeypatch.setattr(metrics, "_WARNED", {"no-java"})  # warning tested elsewhere
    refs = {i: [caption] for i, caption in RESULTS.items()}
    same = caption_metrics(RESULTS, refs, meteor=False)
    assert same["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert same["BLEU-1"] == pytest.approx(1.0, abs=1e-6)
    assert same["ROUGE-L"] == pytest.approx(1.0)
    assert same["CIDEr"] > 0.5

    disjoint = {i: f"zebra{i} xylophone{i} quokka{i} narwhal{i} wombat" for i in RESULTS}
    other = caption_metrics(disjoint, refs, meteor=False)
    assert other["BLEU-1"] == pytest.approx(0.0, abs=1e-6)
    assert other["BLEU-4"] == pytest.approx(0.0, abs=1e-6)
    assert other["ROUGE-L"] == 0.0
    assert other["CIDEr"] == pytest.approx(0.0, abs=1e-9)


def test_without_java_warns_once_and_omits_meteor(no_java: None) -> None:
    with pytest.warns(RuntimeWarning, match="Java not found: METEOR skipped"):
        first = caption_metrics(RESULTS, REFERENCES, meteor=True)
    assert list(first) == KEYS_NO_METEOR
    assert all(math.isfinite(v) for v in first.values())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise here
        second = caption_metrics(RESULTS, REFERENCES)
    assert second == first


def test_spice_failure_warns_and_is_omitted(no_java: None) -> None:
    with pytest.warns(RuntimeWarning) as record:
        got = caption_metrics(RESULTS, REFERENCES, meteor=False, spice=True)
    assert "SPICE" not in got
    assert any("SPICE" in str(w.message) and "CoreNLP" in str(w.message) for w in record)


@pytest.mark.java
@needs_java
def test_spice_download_failure_warns_and_is_omitted(monkeypatch: pytest.MonkeyPatch) -> None:
    from urllib.error import URLError

    from pycocoevalcap.spice.spice import Spice

    def offline(self) -> None:  # what Spice() does when it cannot download CoreNLP
        raise URLError("Name or service not known")

    monkeypatch.setattr(Spice, "__init__", offline)
    with pytest.warns(RuntimeWarning, match="SPICE skipped.*CoreNLP"):
        got = caption_metrics(RESULTS, REFERENCES, meteor=False, spice=True)
    assert list(got) == KEYS_NO_METEOR


@pytest.mark.java
@needs_java
def test_meteor_failure_is_reported_and_java_is_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    from pycocoevalcap.meteor.meteor import Meteor

    def broken(self, gts, res):
        self.lock.acquire()  # like the real one, fail while holding the lock
        raise ValueError("could not convert string to float: b''")

    monkeypatch.setattr(Meteor, "compute_score", broken)
    before = _child_pids()
    with pytest.warns(RuntimeWarning, match="METEOR skipped"):
        got = caption_metrics(RESULTS, REFERENCES)
    assert "METEOR" not in got and "CIDEr" in got
    assert _child_pids() - before == set()


def test_caption_metrics_rejects_bad_input(no_java: None) -> None:
    with pytest.raises(ValueError, match="image 7: no reference captions"):
        caption_metrics({7: "a cat"}, REFERENCES)
    with pytest.raises(ValueError, match="image 1: no reference captions"):
        caption_metrics({1: "a cat"}, {1: []})
    with pytest.raises(ValueError, match="no generated captions"):
        caption_metrics({}, REFERENCES)


# ---------------------------------------------------------------------------- results files


def test_results_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "results.json"
    results = {42: "a red circle", 7: "Ünïcode “quotes” and\nnewline", 0: ""}
    write_coco_results(path, results)
    on_disk = json.loads(path.read_text(encoding="utf-8"))
    assert on_disk == [{"image_id": i, "caption": results[i]} for i in (0, 7, 42)]
    assert read_coco_results(path) == results
    assert not [p for p in path.parent.iterdir() if p.name != "results.json"]  # no temp files


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "invalid JSON"),
        ('{"image_id": 1, "caption": "x"}', "expected a list"),
        ('[{"image_id": 1}]', "[0]: missing key 'caption'"),
        ('[{"image_id": 1, "caption": "x"}, 3]', "[1]: expected object"),
        ('[{"image_id": "1", "caption": "x"}]', "[0].image_id: expected int"),
        ('[{"image_id": true, "caption": "x"}]', "[0].image_id: expected int"),
        ('[{"image_id": 1, "caption": null}]', "[0].caption: expected string"),
        ('[{"image_id": 1, "caption": "x"}, {"image_id": 1, "caption": "y"}]',
         "[1].image_id: duplicate image_id 1"),
    ],
)
def test_read_coco_results_errors(tmp_path: Path, content: str, message: str) -> None:
    from showattend.data.coco import DataFormatError

    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataFormatError) as info:
        read_coco_results(path)
    text = str(info.value)
    assert message in text and str(path) in text and "\n" not in text


def test_read_coco_results_missing_file(tmp_path: Path) -> None:
    from showattend.data.coco import DataFormatError

    with pytest.raises(DataFormatError, match="no such file"):
        read_coco_results(tmp_path / "absent.json")


# ---------------------------------------------------------------------------- grounding


def _peaks(grid: tuple[int, int], cells: list[tuple[int, int]]) -> np.ndarray:
    """(T, h, w) maps, each a soft peak at the given cell (so argmax is that cell)."""
    maps = np.full((len(cells), *grid), 0.1)
    for t, (i, j) in enumerate(cells):
        maps[t, i, j] = 5.0
    return maps / maps.sum(axis=(1, 2), keepdims=True)


RED_CIRCLE = {"colour": "red", "shape": "circle", "size": "small", "bbox": [2, 2, 12, 12]}
BLUE_SQUARE = {"colour": "blue", "shape": "square", "size": "large", "bbox": [36, 36, 20, 20]}


def _ground(words: str, cells, objects, image_size=(64, 64), grid=(4, 4)) -> dict:
    words_l = words.split()
    return grounding([words_l], [_peaks(grid, cells)], [objects], image_size)


def test_grounding_hit_and_miss_by_location() -> None:
    objs = [RED_CIRCLE, BLUE_SQUARE]
    # Cells are 16 px; the red circle lies in cell (0, 0), the blue square in cells (2..3, 2..3).
    hit = _ground("a small red circle", [(3, 3), (3, 3), (0, 0), (0, 0)], objs)
    assert hit == {"grounding": 1.0, "grounding_strict": 1.0, "object_words": 2}
    # "red" looks at the blue square: one hit ("circle"), one miss; "a"/"small" do not count.
    half = _ground("a small red circle", [(0, 0), (0, 0), (3, 3), (0, 0)], objs)
    assert half == {"grounding": 0.5, "grounding_strict": 0.5, "object_words": 2}


def test_grounding_absent_object_is_a_miss() -> None:
    # A green circle is not in the image: looking at the red circle does not make it a hit,
    # and neither does the right colour with the wrong shape.
    absent = _ground("a green circle", [(0, 0)] * 3, [RED_CIRCLE])
    assert absent == {"grounding": 0.0, "grounding_strict": 0.0, "object_words": 2}
    wrong_shape = _ground("a red square", [(0, 0)] * 3, [RED_CIRCLE])
    assert wrong_shape["grounding"] == 0.0


def test_grounding_strict_needs_the_cell_centre_inside_the_box() -> None:
    # Box [14, 24)^2: the peak cell (0, 0) = [0, 16)^2 only overlaps its corner, and the cell
    # centre (8, 8) lies outside: a loose hit, a strict miss.
    edge = {"colour": "red", "shape": "circle", "bbox": [14, 14, 10, 10]}
    at_edge = _ground("red circle", [(0, 0), (0, 0)], [edge])
    assert at_edge == {"grounding": 1.0, "grounding_strict": 0.0, "object_words": 2}
    # Box [14, 30)^2: cell (1, 1) = [16, 32)^2 has its centre (24, 24) inside (strict hit);
    # cell (0, 0) still only touches the corner (strict miss).
    big = {"colour": "red", "shape": "circle", "bbox": [14, 14, 16, 16]}
    centred = _ground("red circle", [(1, 1), (0, 0)], [big])
    assert centred == {"grounding": 1.0, "grounding_strict": 0.5, "object_words": 2}


def test_grounding_non_square_image_and_grid() -> None:
    # Image H=40, W=100 with a 2 x 5 grid: cells are 20 x 20 px, cell (0, 3) = x [60, 80),
    # y [0, 20). Swapping H and W anywhere would make cells 8 wide and 50 tall and miss.
    obj = {"colour": "cyan", "shape": "diamond", "bbox": [62, 2, 14, 14]}
    got = _ground("a cyan diamond", [(1, 0), (0, 3), (0, 3)], [obj], (40, 100), (2, 5))
    assert got == {"grounding": 1.0, "grounding_strict": 1.0, "object_words": 2}
    beside = _ground("a cyan diamond", [(0, 0), (0, 2), (1, 3)], [obj], (40, 100), (2, 5))
    assert beside["grounding"] == 0.0


def test_grounding_counts_over_captions_and_dangling_words() -> None:
    objs = [RED_CIRCLE, BLUE_SQUARE]
    words = ["a small red circle above a large blue square".split(),
             "a red above a blue square".split()]  # "red" has no shape: names no object
    alphas = [_peaks((4, 4), [(0, 0)] * 4 + [(3, 3)] * 5),
              _peaks((4, 4), [(0, 0)] * 4 + [(3, 3)] * 2)]
    got = grounding(words, alphas, [objs, objs], (64, 64))
    # 4 object words in caption 1 (all hits) + 3 in caption 2 ("red" misses, blue square hits).
    assert got["object_words"] == 7
    assert got["grounding"] == pytest.approx(6 / 7)
    assert grounding([[]], [np.zeros((0, 4, 4))], [objs], (64, 64))["grounding"] == 0.0


def test_grounding_rejects_mismatched_maps() -> None:
    with pytest.raises(ValueError, match="does not match 3 words"):
        grounding([["a", "red", "circle"]], [np.ones((2, 4, 4))], [[RED_CIRCLE]], (64, 64))
    with pytest.raises(ValueError, match="object 0"):
        grounding([["red", "circle"]], [np.ones((2, 4, 4))], [[{"colour": "red"}]], (64, 64))


# ---------------------------------------------------------------------------- diagnostics


def test_diagnostics_identical_captions_and_uniform_maps() -> None:
    h, w = 3, 5
    captions = ["a red circle"] * 4
    uniform = [np.full((3, h, w), 1.0 / (h * w)) for _ in captions]
    got = diagnostics(captions, uniform)
    assert got["distinct_captions"] == pytest.approx(1 / 4)
    assert got["vocab_used"] == 3
    assert got["attention_entropy"] == pytest.approx(math.log(h * w))
    assert got["attention_entropy_max"] == pytest.approx(math.log(h * w))
    assert got["attention_change"] == pytest.approx(0.0, abs=1e-12)


def test_diagnostics_one_hot_maps() -> None:
    moving = np.zeros((3, 2, 2))
    moving[0, 0, 0] = moving[1, 1, 1] = moving[2, 1, 1] = 1.0  # change 1, then 0
    got = diagnostics(["a b c", "a b d"], [moving, moving])
    assert got["distinct_captions"] == 1.0
    assert got["vocab_used"] == 4
    assert got["mean_length"] == 3.0
    assert diagnostics(["a b", "a b c d", ""], [moving] * 3)["mean_length"] == 2.0
    assert got["attention_entropy"] == pytest.approx(0.0, abs=1e-12)
    assert got["attention_change"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="2 captions but 1"):
        diagnostics(["a", "b"], [moving])
