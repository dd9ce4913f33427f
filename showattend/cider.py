"""CIDEr-D in process: the reward of sequence-level training, equal to pycocoevalcap's ``Cider``.

pycocoevalcap's scorer (Vedantam et al., 2015, the "D" variant: clipped n-gram counts and a
Gaussian length penalty, σ = 6) re-counts every reference and recomputes document frequencies
on each call, in Python dictionaries. A reward is needed for every sampled caption of every
batch, so here:

* the document frequencies (and log |corpus|) come from a fixed reference corpus — the training
  split's captions — computed once when the scorer is built;
* each image's reference vectors (tf-idf weights, norms, lengths) are computed once and kept;
* a batch of candidates is scored with array operations: the candidates' n-grams are numbered,
  and the clipped products against every reference of their image are one ``np.minimum`` over a
  (candidates × references × n-grams) block, summed per n-gram order by one matrix product.

The arithmetic is pycocoevalcap's, including its quirks, so the numbers agree to rounding:
an n-gram's weight is tf · (log N − log max(1, df)); the "length" used by the penalty is the
number of *bigrams* (pycocoevalcap counts the length where its order index is 1); the score is
10 × the mean over orders 1–4 and over the references of the clipped cosine similarity.
Inputs are token strings (words separated by spaces, already tokenized) or token lists.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

import numpy as np

__all__ = ["CiderD", "ngram_counts"]

Caption = str | Sequence[str]
_BLOCK = 64  # candidates scored together


def _words(c: Caption) -> list[str]:
    return c.split() if isinstance(c, str) else list(c)


def ngram_counts(caption: Caption, n: int = 4) -> Counter:
    """Counts of the 1…n-grams (tuples of words) of one caption."""
    w = _words(caption)
    return Counter(tuple(w[i:i + k]) for k in range(1, n + 1) for i in range(len(w) - k + 1))


class _RefSet:
    """One image's references as tf-idf vectors: {n-gram: weight} per reference, with the norm
    per order (R, n) and the length (R,) pycocoevalcap uses."""

    __slots__ = ("weights", "norms", "lengths")

    def __init__(self, weights: list[dict[tuple, float]], norms: np.ndarray, lengths: np.ndarray):
        self.weights = weights
        self.norms = norms
        self.lengths = lengths


class CiderD:
    """CIDEr-D against a fixed corpus: ``CiderD(corpus)`` with ``corpus`` a mapping image → its
    reference captions (document frequencies count images, as pycocoevalcap does);
    ``score(candidates, image_keys)`` scores each candidate against its image's references
    (those of the corpus, or ``refs`` given per call)."""

    def __init__(self, corpus: Mapping[Hashable, Sequence[Caption]], n: int = 4,
                 sigma: float = 6.0):
        if not corpus:
            raise ValueError("CIDEr-D needs a non-empty reference corpus")
        self.n = n
        self.sigma = sigma
        df: Counter = Counter()
        for refs in corpus.values():
            seen = set()
            for r in refs:
                seen.update(ngram_counts(r, n))
            df.update(seen)
        self.doc_freq = dict(df)
        self.log_n = math.log(float(len(corpus)))
        self._corpus = corpus
        self._cache: dict[Hashable, _RefSet] = {}

    def _vector(self, counts: Counter) -> tuple[dict[tuple, float], np.ndarray, int]:
        """tf-idf weights, norm per order and pycocoevalcap's length (the bigram count)."""
        weights: dict[tuple, float] = {}
        sq = [0.0] * self.n
        length = 0
        for g, tf in counts.items():
            df = np.log(max(1.0, self.doc_freq.get(g, 0.0)))
            w = float(tf) * (self.log_n - df)
            weights[g] = w
            sq[len(g) - 1] += w * w
            if len(g) == 2:
                length += tf
        return weights, np.sqrt(np.array(sq)), length

    def _refs(self, key: Hashable, refs: Sequence[Caption] | None) -> _RefSet:
        if refs is None and key in self._cache:
            return self._cache[key]
        src = refs if refs is not None else self._corpus.get(key)
        if not src:
            raise KeyError(f"no reference captions for image {key!r}")
        vecs = [self._vector(ngram_counts(r, self.n)) for r in src]
        rs = _RefSet([v[0] for v in vecs], np.stack([v[1] for v in vecs]),
                     np.array([v[2] for v in vecs], dtype=np.float64))
        if refs is None:
            self._cache[key] = rs
        return rs

    def score(self, candidates: Sequence[Caption], image_keys: Sequence[Hashable],
              refs: Sequence[Sequence[Caption]] | None = None) -> np.ndarray:
        """CIDEr-D of each candidate (C,) against the references of its image (``image_keys``
        into the corpus, or ``refs[i]`` for candidate i)."""
        c = len(candidates)
        if len(image_keys) != c or (refs is not None and len(refs) != c):
            raise ValueError("one image key (and reference list) per candidate")
        if c == 0:
            return np.zeros(0)
        hyp = [self._vector(ngram_counts(x, self.n)) for x in candidates]
        sets = [self._refs(k, refs[i] if refs is not None else None)
                for i, k in enumerate(image_keys)]
        # blocks of candidates keep the dense (C, R, U) block small (U grows with C)
        return np.concatenate([self._block(hyp[i:i + _BLOCK], sets[i:i + _BLOCK])
                               for i in range(0, c, _BLOCK)])

    def _block(self, hyp: list[tuple[dict[tuple, float], np.ndarray, int]],
               sets: list[_RefSet]) -> np.ndarray:
        c = len(hyp)
        r_max = max(len(s.weights) for s in sets)
        # number the candidates' n-grams: only those can contribute (min(h, r) = 0 elsewhere)
        index: dict[tuple, int] = {}
        for w, _, _ in hyp:
            for g in w:
                index.setdefault(g, len(index))
        u = len(index)
        order = np.zeros((u, self.n))  # (U, n) one-hot n-gram order
        for g, j in index.items():
            order[j, len(g) - 1] = 1.0
        h = np.zeros((c, u))  # (C, U)
        r = np.zeros((c, r_max, u))  # (C, R, U)
        ref_norm = np.zeros((c, r_max, self.n))
        ref_len = np.zeros((c, r_max))
        n_refs = np.zeros(c)
        for i, ((w, _, _), s) in enumerate(zip(hyp, sets)):
            cols = [index[g] for g in w]
            h[i, cols] = list(w.values())
            for k, rw in enumerate(s.weights):
                for g, j in ((g, index[g]) for g in w if g in rw):
                    r[i, k, j] = rw[g]
            m = len(s.weights)
            ref_norm[i, :m] = s.norms
            ref_len[i, :m] = s.lengths
            n_refs[i] = m
        hyp_norm = np.stack([v[1] for v in hyp])  # (C, n)
        hyp_len = np.array([v[2] for v in hyp], dtype=np.float64)  # (C,)
        val = (np.minimum(h[:, None, :], r) * r) @ order  # (C, R, n)
        denom = hyp_norm[:, None, :] * ref_norm  # (C, R, n)
        val = np.divide(val, denom, out=val, where=denom != 0)
        delta = hyp_len[:, None] - ref_len  # (C, R)
        val *= np.exp(-(delta ** 2) / (2 * self.sigma ** 2))[..., None]
        live = np.arange(r_max)[None, :] < n_refs[:, None]  # (C, R) real references
        per_ref = (val * live[..., None]).sum(1)  # (C, n)
        return per_ref.mean(1) / n_refs * 10.0
