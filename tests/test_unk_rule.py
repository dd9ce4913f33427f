"""Decoding never generates the unknown word unless asked (``eval.allow_unk``)."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from showattend.decoding import decode
from showattend.vocab import END_ID, UNK_ID


@pytest.mark.parametrize("beam", [1, 3])
def test_unk_is_never_generated_by_default(beam):
    model = tiny_model(vocab_size=12).eval()
    with torch.no_grad():  # a model that prefers <unk> above every other word
        model.decoder.L_o.bias[UNK_ID] = 8.0
        model.decoder.L_o.bias[END_ID] = -2.0
    feats = model.encode(torch.randn(5, 3, 32, 32))
    plain = decode(model, feats, beam=beam, max_len=6)
    assert not bool((plain.tokens == UNK_ID).any())
    assert int(plain.lengths.min()) >= 0 and bool((plain.tokens == END_ID).any(1).all())
    allowed = decode(model, feats, beam=beam, max_len=6, allow_unk=True)
    assert bool((allowed.tokens == UNK_ID).any())  # the rule, not the model, kept it out
