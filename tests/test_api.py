"""Python API: one load, many images, the same preprocessing as training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import showattend
from showattend.data.images import ImageLoadError
from showattend.loading import load_model


def test_api_matches_training_preprocessing_and_model(trained):
    tmp, run = trained
    cap = showattend.load(run / "best.pt", device="cpu")
    path = sorted((tmp / "data" / "images" / "test").glob("*.png"))[0]
    # the API's tensor for a path equals the training pipeline's tensor
    model, vocab, preprocess, cfg, _ = load_model(run / "best.pt")
    assert preprocess == cap.preprocess
    [c_path] = cap.caption([path], beam=2)
    [c_pil] = cap.caption([Image.open(path)], beam=2)
    assert c_path.words == c_pil.words and c_path.score == pytest.approx(c_pil.score)
    assert c_path.attention.shape == (len(c_path.words), 8, 8)
    np.testing.assert_allclose(c_path.attention.sum((1, 2)), 1.0, rtol=1e-5)
    assert c_path.beta.shape == (len(c_path.words),)
    assert c_path.view.shape == (64, 64, 3) and c_path.view.dtype == np.uint8
    # batched captioning equals one-by-one
    paths = sorted((tmp / "data" / "images" / "test").glob("*.png"))[:5]
    many = cap.caption(paths, beam=2, batch_size=3)
    ones = [cap.caption([p], beam=2)[0] for p in paths]
    assert [c.words for c in many] == [c.words for c in ones]


def test_api_any_image_shape_and_mode(trained, tmp_path):
    _, run = trained
    cap = showattend.load(run, device="cpu")  # a run directory works too
    rgba = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 90, 4), dtype=np.uint8), "RGBA")
    grey16 = Image.fromarray(np.full((50, 20), 40000, np.uint16))
    out = cap.caption([rgba, grey16], beam=1)
    assert len(out) == 2 and all(c.view.shape == (64, 64, 3) for c in out)
    fig = cap.overlay(out[0])
    assert len([a for a in fig.axes if a.images]) == len(out[0].words) + 1
    rec = out[0].to_json()
    assert set(rec) == {"image", "caption", "words", "score", "attention", "beta"}


def test_api_bad_image_raises_clear_error(trained, tmp_path):
    _, run = trained
    cap = showattend.load(run / "best.pt", device="cpu")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ImageLoadError, match="bad.png"):
        cap.caption([bad])


def test_hard_api_boxes(tmp_path):
    from conftest import tiny_model
    from showattend.api import CaptionerAPI, crop_boxes
    from showattend.config import Config
    from showattend.data.images import Preprocessor
    from showattend.vocab import Vocab

    vocab = Vocab.build(["a red circle", "a blue square above a red circle"])
    model = tiny_model("hard", vocab_size=len(vocab), window=3).eval()
    api = CaptionerAPI(model, vocab, Preprocessor((32, 48), (0.5,) * 3, (0.25,) * 3), Config(),
                       torch.device("cpu"))
    [c] = api.caption([Image.new("RGB", (48, 32), "red")], beam=2, max_len=5)
    assert c.boxes is not None and len(c.boxes) == len(c.words)
    # boxes are the k×k crop around the chosen cell, clipped at the border, in pixels
    assert crop_boxes(np.array([0]), (4, 4), 3, (32, 48)) == [(0.0, 0.0, 24.0, 16.0)]
    assert crop_boxes(np.array([5]), (4, 4), 3, (32, 48)) == [(0.0, 0.0, 36.0, 24.0)]
    assert crop_boxes(np.array([15]), (4, 4), 1, (32, 48)) == [(36.0, 24.0, 48.0, 32.0)]
