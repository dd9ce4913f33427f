"""Tokenizer and vocabulary: examples plus property-based checks (hypothesis).

Properties: tokenize never crashes on any string and gives lower-case tokens without spaces;
encode/decode round-trips every in-vocabulary word sequence; ids are always in range; build is
independent of caption order; to_dict/from_dict round-trips through JSON; and the only errors are
the documented ones (TypeError for a non-string caption, VocabError for a bad vocabulary).
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from showattend.vocab import (END_ID, PAD_ID, SPECIALS, START_ID, UNK, UNK_ID, Vocab, VocabError,
                              tokenize)

PROPERTY = settings(max_examples=60, deadline=None)

# Text that looks like captions (letters, digits, punctuation, apostrophes, hyphens, spaces in
# several scripts) plus fully arbitrary unicode.
CAPTION_CHARS = st.sampled_from(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                     "0123456789 .,;:!?'-_\"()\t\néüßçΣσςİıДжあ漢"))
CAPTIONS = st.text(CAPTION_CHARS, max_size=60) | st.text(max_size=40)


# --- examples --------------------------------------------------------------------------------


def test_tokenize_examples():
    assert tokenize("A dog, running.") == ["a", "dog", "running"]
    assert tokenize("Don't wear a T-shirt!") == ["don't", "wear", "a", "t-shirt"]
    assert tokenize("  \n\t ") == []
    assert tokenize("snake_case words") == ["snake", "case", "words"]  # "_" is not a letter


def test_build_order_and_specials():
    v = Vocab.build(["b a", "a c", "a b"], min_freq=1)
    assert v.itos[:4] == list(SPECIALS)
    assert v.itos[4:] == ["a", "b", "c"]  # most frequent first, ties alphabetical
    assert Vocab.build(["b a", "a c", "a b"], min_freq=2).itos[4:] == ["a", "b"]
    assert Vocab.build(["b a", "a c"], max_size=5).itos == [*SPECIALS, "a"]


def test_encode_decode_examples():
    v = Vocab.build(["a red circle", "a blue square"])
    ids = v.encode("A red TRIANGLE.", max_len=20)
    assert ids[0] == START_ID and ids[-1] == END_ID
    assert v.decode(ids) == ["a", "red", UNK]
    assert v.encode("a red circle", max_len=2) == [START_ID, v.stoi["a"], v.stoi["red"], END_ID]
    assert v.encode("", max_len=5) == [START_ID, END_ID]
    # decode stops at <end>, skips <start>/<pad>, maps ids outside the table to <unk>
    assert v.decode([START_ID, v.stoi["a"], PAD_ID, 999, -1, END_ID, v.stoi["red"]]) == [
        "a", UNK, UNK]


def test_documented_errors():
    v = Vocab.build(["a b"])
    with pytest.raises(TypeError, match="caption must be a string"):
        v.encode(None, 5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Vocab.build(["ok", 3])  # type: ignore[list-item]
    for bad in ({}, {"words": "abc"}, {"words": [1, 2]}, {"words": ["a", "b"]},
                {"words": [*SPECIALS, "x", "x"]}, [], None):
        with pytest.raises(VocabError):
            Vocab.from_dict(bad)  # type: ignore[arg-type]


# --- properties ------------------------------------------------------------------------------


@PROPERTY
@given(text=CAPTIONS)
def test_tokenize_never_crashes_and_is_normalised(text):
    toks = tokenize(text)
    assert all(isinstance(t, str) and t and not any(c.isspace() for c in t) for t in toks)
    assert all(t == t.lower() for t in toks)
    # tokenising the tokens again changes nothing (what encode/decode round trips rely on)
    assert tokenize(" ".join(toks)) == toks


@PROPERTY
@given(captions=st.lists(CAPTIONS, min_size=1, max_size=8), data=st.data())
def test_encode_decode_round_trip_on_in_vocab_words(captions, data):
    vocab = Vocab.build(captions)
    words = [w for c in captions for w in tokenize(c)]
    if words:
        seq = data.draw(st.lists(st.sampled_from(words), max_size=25))
    else:
        seq = []
    ids = vocab.encode(" ".join(seq), max_len=30)
    assert ids[0] == START_ID and ids[-1] == END_ID
    assert UNK_ID not in ids  # every word is in the vocabulary
    assert vocab.decode(ids) == seq
    assert vocab.decode(ids[1:]) == seq  # without <start> as well


@PROPERTY
@given(captions=st.lists(CAPTIONS, max_size=6), text=CAPTIONS,
       max_len=st.integers(1, 40), min_freq=st.integers(-1, 3))
def test_ids_always_in_range(captions, text, max_len, min_freq):
    vocab = Vocab.build(captions, min_freq=min_freq)
    ids = vocab.encode(text, max_len)
    assert 2 <= len(ids) <= max_len + 2
    assert all(0 <= i < len(vocab) for i in ids)
    assert PAD_ID not in ids and ids.count(START_ID) == 1 and ids.count(END_ID) == 1
    words = vocab.decode(ids)
    assert len(words) == len(ids) - 2
    assert all(w in vocab.stoi for w in words)


@PROPERTY
@given(ids=st.lists(st.integers(-10**6, 10**6), max_size=30))
def test_decode_any_ids_never_crashes(ids):
    vocab = Vocab.build(["a red circle left of a blue square"])
    words = vocab.decode(ids)
    assert all(w in vocab.stoi for w in words)
    assert not set(words) & {"<pad>", "<start>", "<end>"}


@PROPERTY
@given(captions=st.lists(CAPTIONS, max_size=8), seed=st.randoms(use_true_random=False),
       max_size=st.integers(0, 12))
def test_build_is_deterministic_and_round_trips_through_json(captions, seed, max_size):
    vocab = Vocab.build(captions, max_size=max_size)
    shuffled = list(captions)
    seed.shuffle(shuffled)
    assert Vocab.build(shuffled, max_size=max_size) == vocab
    assert len(set(vocab.itos)) == len(vocab)
    if max_size >= len(SPECIALS):
        assert len(vocab) <= max_size
    again = Vocab.from_dict(json.loads(json.dumps(vocab.to_dict())))
    assert again == vocab and again.stoi == vocab.stoi


@PROPERTY
@given(obj=st.none() | st.integers() | st.floats() | st.binary(max_size=8)
       | st.lists(st.text(max_size=3), max_size=3))
def test_non_string_caption_is_a_type_error(obj):
    vocab = Vocab.build(["a b"])
    with pytest.raises(TypeError):
        vocab.encode(obj, 5)


@PROPERTY
@given(d=st.dictionaries(st.sampled_from(["words", "other"]),
                         st.lists(st.text(max_size=4) | st.integers(), max_size=6)
                         | st.text(max_size=4) | st.none(), max_size=2))
def test_from_dict_only_raises_vocab_error(d):
    try:
        vocab = Vocab.from_dict(d)
    except VocabError:
        return
    assert vocab.itos == d["words"]
