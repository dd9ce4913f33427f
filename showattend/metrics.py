"""Caption metrics (pycocoevalcap), attention grounding and attention diagnostics.

COCO metrics call pycocoevalcap's scorers directly after its PTBTokenizer, never
``COCOEvalCap.evaluate``: that one also runs SPICE, which downloads Stanford CoreNLP at run time.
Grounding asks whether the attention peak for each object word lies on the object it names (the
synthetic "grounded shapes" data knows every object's box), which BLEU cannot tell.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from showattend.io import atomic_write_json

__all__ = [
    "COLOURS",
    "SHAPES",
    "SIZE_WORDS",
    "caption_metrics",
    "caption_scores",
    "diagnostics",
    "grounding",
    "read_coco_results",
    "simple_tokenize",
    "write_coco_results",
]

# The grounded-shapes vocabulary (showattend.data.shapes). Repeated here rather than imported so
# that evaluating needs nothing from the generator; grounding() takes overrides.
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "cyan", "magenta")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
SIZE_WORDS: tuple[str, ...] = ("small", "large")

# Messages already warned about in this process (warn once, not once per evaluation).
_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _java_available() -> bool:
    # PTBTokenizer, Meteor and Spice all run the bare command "java", so look it up the same way.
    return shutil.which("java") is not None


# --------------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------------

# Splits the clitics Stanford's PTB tokenizer splits: "don't" -> "do n't", "man's" -> "man 's".
_CLITIC_RE = re.compile(r"(?<=\w)(n't|'(?:s|m|d|re|ve|ll))\b")
_TOKEN_RE = re.compile(
    r"""
      n't | '(?:s|m|d|re|ve|ll)\b     # clitics (split off by _CLITIC_RE)
    | \d+(?:[.,:/]\d+)+               # 3.5  5:30  3,000  1/2
    | (?:[^\W\d_]\.){2,}              # acronyms and abbreviations: u.s.a.  p.m.  e.g.
    | \w+(?:[-'/]\w+)*                # words, with internal hyphen, apostrophe, slash
    | \.\.\. | -- | `` | ''           # multi-character punctuation
    | \S                              # any other single character
    """,
    re.VERBOSE,
)
# Stanford's output for these characters (with -lowerCase); its brackets come out lower-cased and
# so survive pycocoevalcap's punctuation filter, which lists them upper-cased. Mimicked, so that
# scores with and without Java agree wherever the two tokenizers agree.
_PTB_MAP = {
    "(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-",
    '"': "''",
}
_QUOTE_TRANS = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})
# pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS, copied so the fallback needs no import.
_PTB_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
     ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)


def simple_tokenize(text: str) -> str:
    """Pure-Python stand-in for pycocoevalcap's PTBTokenizer on one caption.

    Lower-cases, splits punctuation and clitics off words and drops the punctuation tokens that
    pycocoevalcap drops; returns the tokens joined by single spaces. It agrees with the Java
    tokenizer on ordinary captions, not on every corner of the PTB lexer (e.g. "mr.").
    """
    text = _CLITIC_RE.sub(r" \1", text.translate(_QUOTE_TRANS).lower())
    tokens = (_PTB_MAP.get(tok, tok) for tok in _TOKEN_RE.findall(text))
    return " ".join(tok for tok in tokens if tok not in _PTB_PUNCTUATION)


def _tokenize(captions: dict[Any, list[str]], java: bool) -> dict[Any, list[str]]:
    """Tokenise {key: [caption, ...]} with PTBTokenizer (Java) or :func:`simple_tokenize`."""
    # Any whitespace run becomes one space first: the Java tokenizer reads one caption per line,
    # and a stray "\r" or "\v" inside a caption would shift every later caption by a line.
    clean = {key: [" ".join(c.split()) for c in caps] for key, caps in captions.items()}
    if not java:
        return {key: [simple_tokenize(c) for c in caps] for key, caps in clean.items()}

    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # Java writes "PTBTokenizer tokenized N tokens at …" to the inherited stderr at every call:
    # news to nobody. Its stderr goes to a file, shown only when the tokenizer fails.
    with tempfile.TemporaryFile() as err, _stderr_to(err):
        out = PTBTokenizer().tokenize({k: [{"caption": c} for c in caps]
                                       for k, caps in clean.items()})
        err.seek(0)
        said = err.read().decode("utf-8", "replace")
    # PTBTokenizer never checks Java's exit status; a failed run shows up as missing lines.
    if any(len(out.get(key, ())) != len(caps) for key, caps in clean.items()):
        n_in = sum(len(caps) for caps in clean.values())
        n_out = sum(len(caps) for caps in out.values())
        last = [ln for ln in said.splitlines() if ln.strip()][-1:] or ["nothing on stderr"]
        raise RuntimeError(f"PTBTokenizer (Java) returned {n_out} captions for {n_in} "
                           f"({last[0]})")
    return out


@contextlib.contextmanager
def _stderr_to(f):
    """File descriptor 2 (what child processes inherit) pointed at ``f`` for the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        os.dup2(f.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# --------------------------------------------------------------------------------------------
# COCO caption metrics
# --------------------------------------------------------------------------------------------


def _check_caption_inputs(
    results: Mapping[int, str], references: Mapping[int, Sequence[str]]
) -> list[int]:
    if not results:
        raise ValueError("no generated captions to evaluate")
    ids = []
    for image_id, caption in results.items():
        if not isinstance(caption, str):
            raise ValueError(f"image {image_id}: caption is {type(caption).__name__}, not str")
        refs = references.get(image_id)
        if refs is None or isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"image {image_id}: no reference captions")
        if not all(isinstance(r, str) for r in refs):
            raise ValueError(f"image {image_id}: reference captions must be strings")
        ids.append(image_id)
    return ids


def _start_meteor() -> Any | None:
    """Start pycocoevalcap's METEOR scorer (a Java process); None if it cannot start."""
    from pycocoevalcap.meteor.meteor import Meteor

    try:
        return Meteor()
    except OSError as exc:
        warnings.warn(f"METEOR skipped: cannot start Java ({exc})", RuntimeWarning, stacklevel=3)
        return None


def _close_meteor(scorer: Any) -> None:
    """Stop METEOR's Java process now rather than whenever the scorer is garbage-collected."""
    proc = scorer.meteor_p
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            try:
                stream.close()
            except OSError:  # closing stdin flushes into a pipe the JVM may already have closed
                pass
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    # Meteor.compute_score takes its lock and does not release it when it raises; Meteor.__del__
    # takes the same lock, so leaving it held would hang the garbage collector.
    if scorer.lock.locked():
        scorer.lock.release()


def caption_metrics(
    results: Mapping[int, str],
    references: Mapping[int, Sequence[str]],
    meteor: bool = True,
    spice: bool = False,
) -> dict[str, float]:
    """COCO caption metrics of ``results`` (image id → caption) against ``references``.

    Evaluates the images in ``results`` (each must have at least one reference). Returns
    "BLEU-1".."BLEU-4", "METEOR", "ROUGE-L", "CIDEr" (and "SPICE" when ``spice`` and it works).
    Without ``java`` on PATH, warns once, tokenises with :func:`simple_tokenize` and omits METEOR.
    Every Java process started here has exited when this returns.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ids = _check_caption_inputs(results, references)
    java = _java_available()
    if not java:
        _warn_once("no-java", "Java not found: METEOR skipped, simple tokenizer used")

    # Start METEOR first: its JVM spends seconds loading paraphrase tables, which overlaps with
    # tokenising and the pure-Python scorers below.
    meteor_scorer = _start_meteor() if meteor and java else None
    scores: dict[str, float] = {}
    try:
        # One tokenizer run for references and hypotheses: one JVM start instead of two.
        raw = {("ref", i): list(references[i]) for i in ids}
        raw.update({("hyp", i): [results[i]] for i in ids})
        tok = _tokenize(raw, java)
        gts = {i: tok[("ref", i)] for i in ids}
        res = {i: tok[("hyp", i)] for i in ids}

        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        rouge = float(Rouge().compute_score(gts, res)[0])
        cider = float(Cider().compute_score(gts, res)[0])
        scores.update({f"BLEU-{n}": float(value) for n, value in enumerate(bleu, start=1)})
        if meteor_scorer is not None:  # last: by now its JVM has had the longest to load
            try:
                scores["METEOR"] = float(meteor_scorer.compute_score(gts, res)[0])
            except (OSError, ValueError) as exc:  # JVM died (e.g. could not reserve its heap)
                warnings.warn(f"METEOR skipped: the Java scorer failed ({exc!r})",
                              RuntimeWarning, stacklevel=2)
        scores["ROUGE-L"] = rouge
        scores["CIDEr"] = cider
    finally:
        if meteor_scorer is not None:
            _close_meteor(meteor_scorer)

    if spice:
        value = _spice(gts, res) if java else None
        if value is not None:
            scores["SPICE"] = value
        else:
            warnings.warn("SPICE skipped: it needs Java and Stanford CoreNLP, which "
                          "pycocoevalcap downloads at run time", RuntimeWarning, stacklevel=2)
    return scores


def caption_scores(
    results: Mapping[Any, str], references: Mapping[Any, Sequence[str]]
) -> dict[Any, dict[str, float]]:
    """Per-caption BLEU-4 and CIDEr: {key: {"BLEU-4": b, "CIDEr": c}} for every key of ``results``.

    The same tokenizer and scorers as :func:`caption_metrics` (no METEOR, no SPICE). CIDEr's
    document frequencies come from the references given here, so a caption's CIDEr depends on the
    set it is scored with (with one image every n-gram is in every document and CIDEr is 0).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    ids = _check_caption_inputs(results, references)  # type: ignore[arg-type]
    java = _java_available()
    if not java:
        _warn_once("no-java", "Java not found: METEOR skipped, simple tokenizer used")
    raw = {("ref", i): list(references[i]) for i in ids}
    raw.update({("hyp", i): [results[i]] for i in ids})
    tok = _tokenize(raw, java)
    # both scorers return per-image values in the order of the gts keys
    gts = {n: tok[("ref", i)] for n, i in enumerate(ids)}
    res = {n: tok[("hyp", i)] for n, i in enumerate(ids)}
    _, bleu = Bleu(4).compute_score(gts, res, verbose=0)  # bleu[3]: BLEU-4 per image
    _, cider = Cider().compute_score(gts, res)
    return {i: {"BLEU-4": float(bleu[3][n]), "CIDEr": float(cider[n])} for n, i in enumerate(ids)}


def _spice(gts: dict[int, list[str]], res: dict[int, list[str]]) -> float | None:
    """SPICE score, or None when it cannot run (no CoreNLP download, Java failure, ...)."""
    from pycocoevalcap.spice.spice import Spice

    try:
        return float(Spice().compute_score(gts, res)[0])
    # SPICE fails in many ways (URLError, CalledProcessError, JSON, zip, ...); all mean "no SPICE".
    except Exception:  # noqa: BLE001
        return None


# --------------------------------------------------------------------------------------------
# Results files
# --------------------------------------------------------------------------------------------


def write_coco_results(path: str | os.PathLike, results: Mapping[int, str]) -> None:
    """Write COCO results JSON, ``[{"image_id", "caption"}, ...]`` sorted by id, atomically."""
    entries = [{"image_id": int(i), "caption": str(c)} for i, c in sorted(results.items())]
    atomic_write_json(path, entries)


def read_coco_results(path: str | os.PathLike) -> dict[int, str]:
    """Read a COCO results JSON file, ``[{"image_id", "caption"}, ...]``, into {image_id: caption}.

    Raises DataFormatError (one line naming the file and entry, e.g. ``res.json: [3].image_id:
    expected int, got string``) for unreadable files, invalid JSON, wrong types, missing keys
    and duplicate image ids.
    """
    # Imported here so importing metrics does not import the data readers.
    from showattend.data.coco import DataFormatError

    path = Path(path)
    try:
        data = json.loads(path.read_bytes())  # bytes: json detects UTF-8/16/32 itself
    except FileNotFoundError:
        raise DataFormatError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataFormatError(f"{path}: is a directory") from None
    except OSError as exc:
        raise DataFormatError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: "
                              f"{exc.msg}") from None
    except (ValueError, RecursionError) as exc:  # undecodable bytes; absurdly deep nesting
        raise DataFormatError(f"{path}: invalid JSON: {type(exc).__name__}") from None
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a list of {{image_id, caption}} objects, "
                              f"got {type(data).__name__}")
    out: dict[int, str] = {}
    first_seen: dict[int, int] = {}
    for k, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise DataFormatError(f"{path}: [{k}]: expected object, got {type(entry).__name__}")
        for key in ("image_id", "caption"):
            if key not in entry:
                raise DataFormatError(f"{path}: [{k}]: missing key {key!r}")
        image_id, caption = entry["image_id"], entry["caption"]
        if not isinstance(image_id, int) or isinstance(image_id, bool):
            raise DataFormatError(f"{path}: [{k}].image_id: expected int, "
                                  f"got {type(image_id).__name__}")
        if not isinstance(caption, str):
            raise DataFormatError(f"{path}: [{k}].caption: expected string, "
                                  f"got {type(caption).__name__}")
        if image_id in out:
            # Two captions for one image would make every scorer's one-hypothesis check fail.
            raise DataFormatError(f"{path}: [{k}].image_id: duplicate image_id {image_id} "
                                  f"(first at [{first_seen[image_id]}])")
        out[image_id] = caption
        first_seen[image_id] = k
    return out


# --------------------------------------------------------------------------------------------
# Attention grounding
# --------------------------------------------------------------------------------------------


def _object_words(
    words: Sequence[str], colours: frozenset[str], shapes: frozenset[str], sizes: frozenset[str]
) -> list[tuple[int, tuple[str, str] | None]]:
    """(word position, (colour, shape) named by its mention or None) for each object word.

    A mention is [size] colour shape; both its colour and its shape word are object words. A
    colour or shape word outside a complete mention names no object (None): it counts as a miss.
    """
    words = [w.lower() for w in words]
    found: list[tuple[int, tuple[str, str] | None]] = []
    k = 0
    while k < len(words):
        start = k + 1 if words[k] in sizes else k
        if (start + 1 < len(words) and words[start] in colours and words[start + 1] in shapes):
            named = (words[start], words[start + 1])
            found += [(start, named), (start + 1, named)]
            k = start + 2
            continue
        if words[k] in colours or words[k] in shapes:
            found.append((k, None))
        k += 1
    return found


def _cell_hits(
    alpha: np.ndarray, bbox: Sequence[float], image_size: tuple[int, int]
) -> tuple[bool, bool]:
    """(peak cell overlaps bbox, peak cell's centre lies in bbox) for one (h, w) map."""
    H, W = image_size
    h, w = alpha.shape
    i, j = np.unravel_index(int(np.argmax(alpha)), alpha.shape)
    # Cell (i, j) covers [j W/w, (j+1) W/w) x [i H/h, (i+1) H/h); bbox [x, y, bw, bh] covers
    # [x, x+bw) x [y, y+bh): pixel x spans [x, x+1), so a 1-pixel box still has area.
    cx0, cx1 = j * W / w, (j + 1) * W / w
    cy0, cy1 = i * H / h, (i + 1) * H / h
    x, y, bw, bh = (float(v) for v in bbox)
    loose = cx0 < x + bw and x < cx1 and cy0 < y + bh and y < cy1
    mx, my = (cx0 + cx1) / 2, (cy0 + cy1) / 2
    strict = x <= mx < x + bw and y <= my < y + bh
    return bool(loose), bool(strict)


def grounding(
    words_list: Sequence[Sequence[str]],
    alphas_list: Sequence[np.ndarray],
    objects_list: Sequence[Sequence[Mapping[str, Any]]],
    image_size: tuple[int, int],
    *,
    colours: Sequence[str] = COLOURS,
    shapes: Sequence[str] = SHAPES,
    sizes: Sequence[str] = SIZE_WORDS,
) -> dict[str, float | int]:
    """Share of generated object words whose attention peak falls on the object they name.

    Per image: ``words`` (no special tokens), ``alphas`` (T, h, w) one map per word, ``objects``
    [{"colour", "shape", "bbox": [x, y, w, h]}] in pixels of an image of ``image_size`` (H, W).
    An object word is the colour or shape word of a mention "[size] colour shape"; it is a hit if
    the grid cell at its map's peak overlaps the box of an object with that colour and shape
    ("grounding"), or if that cell's centre lies inside the box ("grounding_strict"). Words naming
    an absent object are misses. Returns {"grounding", "grounding_strict", "object_words"}.
    """
    if not len(words_list) == len(alphas_list) == len(objects_list):
        raise ValueError(f"grounding: {len(words_list)} captions, {len(alphas_list)} attention "
                         f"sequences and {len(objects_list)} object lists")
    colour_set, shape_set = frozenset(colours), frozenset(shapes)
    size_set = frozenset(sizes)
    n_words = hits = strict_hits = 0
    for n, (words, alphas, objects) in enumerate(zip(words_list, alphas_list, objects_list)):
        alphas = np.asarray(alphas, dtype=np.float64)
        if alphas.ndim != 3 or alphas.shape[0] != len(words):
            raise ValueError(f"grounding: image {n}: attention shape {alphas.shape} does not "
                             f"match {len(words)} words (expected (T, h, w))")
        boxes: dict[tuple[str, str], list[Sequence[float]]] = {}
        for k, obj in enumerate(objects):
            try:
                key = (str(obj["colour"]).lower(), str(obj["shape"]).lower())
                boxes.setdefault(key, []).append(obj["bbox"])
            except (KeyError, TypeError):
                raise ValueError(f"grounding: image {n}: object {k} needs colour, shape and "
                                 f"bbox") from None
        for t, named in _object_words(words, colour_set, shape_set, size_set):
            n_words += 1
            results = [_cell_hits(alphas[t], b, image_size) for b in boxes.get(named, [])]
            hits += any(loose for loose, _ in results)
            strict_hits += any(strict for _, strict in results)
    return {
        "grounding": hits / n_words if n_words else 0.0,
        "grounding_strict": strict_hits / n_words if n_words else 0.0,
        "object_words": n_words,
    }


# --------------------------------------------------------------------------------------------
# Diagnostics
# --------------------------------------------------------------------------------------------


def _repeats_bigram(words: Sequence[str]) -> bool:
    """True if some word pair occurs twice ("a blue shirt and a blue shirt")."""
    pairs = list(zip(words, words[1:]))
    return len(set(pairs)) < len(pairs)


def diagnostics(
    captions: Sequence[str], alphas_list: Sequence[np.ndarray]
) -> dict[str, float | int]:
    """Collapse and attention-sharpness indicators for a set of generated captions.

    "distinct_captions": share of distinct captions; "repetition_rate": share of captions in which
    a word bigram occurs twice; "vocab_used": number of distinct words; "mean_length": words per
    caption;
    "attention_entropy": mean entropy (nats) of the per-word maps; "attention_entropy_max": the
    entropy of a uniform map, log(h*w); "attention_change": mean total-variation distance (0..1)
    between the maps of consecutive words of a caption.
    """
    if len(alphas_list) != len(captions):
        raise ValueError(f"diagnostics: {len(captions)} captions but "
                         f"{len(alphas_list)} attention sequences")
    distinct = len(set(captions)) / len(captions) if captions else 0.0
    repeated = sum(_repeats_bigram(c.split()) for c in captions)
    vocab = {word for caption in captions for word in caption.split()}

    entropies: list[np.ndarray] = []
    max_entropies: list[float] = []
    changes: list[np.ndarray] = []
    for alphas in alphas_list:
        a = np.asarray(alphas, dtype=np.float64)
        if a.ndim != 3:
            raise ValueError(f"diagnostics: attention shape {a.shape}, expected (T, h, w)")
        if a.shape[0] == 0:
            continue
        p = a.reshape(a.shape[0], -1)  # (T, h*w)
        # Renormalise: maps may arrive as float16 or cropped and not sum to exactly 1.
        p = p / np.clip(p.sum(axis=1, keepdims=True), 1e-300, None)
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)  # 0 log 0 = 0
        entropies.append(-plogp.sum(axis=1))  # (T,)
        max_entropies += [math.log(p.shape[1])] * p.shape[0]
        if p.shape[0] > 1:
            changes.append(0.5 * np.abs(np.diff(p, axis=0)).sum(axis=1))  # (T-1,)

    def mean(parts: list[np.ndarray]) -> float:
        return float(np.concatenate(parts).mean()) if parts else 0.0

    return {
        "distinct_captions": distinct,
        "repetition_rate": repeated / len(captions) if captions else 0.0,
        "vocab_used": len(vocab),
        "mean_length": float(np.mean([len(c.split()) for c in captions])) if captions else 0.0,
        "attention_entropy": mean(entropies),
        "attention_entropy_max": float(np.mean(max_entropies)) if max_entropies else 0.0,
        "attention_change": mean(changes),
    }
