"""Tokenisation and vocabulary: pure functions and a small immutable class.

Tokenisation is one regular expression (what nltk's RegexpTokenizer would run, without its
import cost; no data packages to download), lower-cases, and keeps word tokens only, so "A dog, running." → ["a", "dog", "running"].
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any


PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
PAD_ID, START_ID, END_ID, UNK_ID = 0, 1, 2, 3

# Words are runs of letters/digits, optionally with an inner apostrophe or hyphen ("don't",
# "t-shirt"); punctuation is dropped, as the PTB tokenizer used for COCO evaluation does.
# (nltk's RegexpTokenizer with this pattern is re.findall with these flags; importing nltk for
# it cost a quarter of a second of every `showattend caption`.)
_TOKENIZER = re.compile(r"[^\W_]+(?:['\-][^\W_]+)*", re.UNICODE | re.MULTILINE | re.DOTALL)


class VocabError(ValueError):
    """A vocabulary could not be built or loaded."""


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens of ``text``."""
    if not isinstance(text, str):
        raise TypeError(f"caption must be a string, got {type(text).__name__}")
    return _TOKENIZER.findall(text.lower())


class Vocab:
    """Bidirectional word ↔ id map with the four special tokens at ids 0–3."""

    def __init__(self, words: Sequence[str]):
        words = list(words)
        if tuple(words[:4]) != SPECIALS:
            raise VocabError(f"vocabulary must start with {SPECIALS}")
        if len(set(words)) != len(words):
            raise VocabError("vocabulary has duplicate words")
        self.itos: list[str] = words
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(words)}

    @classmethod
    def build(cls, captions: Iterable[str], min_freq: int = 1, max_size: int = 0) -> Vocab:
        """Vocabulary of words seen at least ``min_freq`` times (most frequent first, ties sorted)."""
        counts = Counter(tok for cap in captions for tok in tokenize(cap))
        kept = sorted((w for w, c in counts.items() if c >= min_freq and w not in SPECIALS),
                      key=lambda w: (-counts[w], w))
        if max_size > 0:
            kept = kept[: max(0, max_size - len(SPECIALS))]
        return cls(list(SPECIALS) + kept)

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.itos == other.itos

    def encode(self, caption: str, max_len: int) -> list[int]:
        """``<start> w1 … wn <end>`` ids, with at most ``max_len`` words; unknown words → <unk>."""
        ids = [self.stoi.get(tok, UNK_ID) for tok in tokenize(caption)[:max_len]]
        return [START_ID, *ids, END_ID]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words up to the first <end>, skipping <start>/<pad>."""
        words = []
        for i in ids:
            i = int(i)
            if i == END_ID:
                break
            if i in (PAD_ID, START_ID):
                continue
            words.append(self.itos[i] if 0 <= i < len(self.itos) else UNK)
        return words

    def to_dict(self) -> dict[str, Any]:
        """JSON/checkpoint-safe form."""
        return {"words": list(self.itos)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Vocab:
        """Inverse of :meth:`to_dict`."""
        if not isinstance(d, dict) or not isinstance(d.get("words"), list) or not all(
            isinstance(w, str) for w in d["words"]
        ):
            raise VocabError("vocabulary must be {'words': [str, ...]}")
        return cls(d["words"])
