"""Captioning many files: DataLoader workers ahead of the model, and the int8 decoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import showattend
from showattend.cli import main
from showattend.data.folder import default_workers, image_batches
from showattend.evaluation import evaluate_checkpoint


def _photos(folder, n: int = 7):
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(n):
        arr = rng.integers(0, 255, (40 + 3 * i, 50, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"im{i}.png")
    (folder / "im3b.jpg").write_bytes(b"not a jpeg")  # sorted between im3 and im4
    return sorted(folder.iterdir())


def test_workers_give_the_in_process_results_in_path_order(trained, tmp_path):
    _, run = trained
    paths = _photos(tmp_path / "p")
    cap = showattend.load(run / "best.pt", device="cpu")
    runs = {w: list(cap.caption_paths([tmp_path / "p"], beam=2, batch_size=3, workers=w))
            for w in (0, 2)}
    for w, res in runs.items():
        assert [p for p, _, _ in res] == paths, w  # path order, bad file in its place
        assert [err is not None for _, _, err in res] == [p.name == "im3b.jpg" for p in paths]
    for (_, a, _), (_, b, _) in zip(*runs.values()):
        if a is not None:
            assert a.caption == b.caption and a.score == pytest.approx(b.score, abs=1e-5)
            np.testing.assert_allclose(a.attention, b.attention, atol=1e-6)
            assert np.array_equal(a.view, b.view)
    # and the batched pipeline gives what caption() gives one image at a time
    [single] = cap.caption([paths[0]], beam=2)
    assert single.caption == runs[2][0][1].caption


def test_default_workers():
    assert default_workers(5, 16) == 0  # one batch: no process start-up
    assert 1 <= default_workers(500, 16) <= 2


def test_image_batches_keep_every_path_once(tmp_path):
    paths = _photos(tmp_path / "p")
    from showattend.data.images import Preprocessor

    pre = Preprocessor((16, 16), (0.5,) * 3, (0.25,) * 3)
    got = [it for b in image_batches(paths, pre, batch_size=3, workers=1) for it in b]
    assert [it.path for it in got] == paths
    ok = [it for it in got if it.error is None]
    assert all(it.pixels.shape == (3, 16, 16) and it.view.shape == (16, 16, 3) for it in ok)
    assert torch.equal(ok[0].pixels, pre.normalize(pre.view(Image.open(paths[0]))))


def test_int8_decoder_is_quantized_and_agrees_with_fp32(trained, tmp_path):
    _, run = trained
    fp = showattend.load(run / "best.pt", device="cpu")
    q = showattend.load(run / "best.pt", device="cpu", int8=True)
    mods = list(q.model.decoder.modules())
    quantized = {type(m).__name__ for m in mods if ".quantized.dynamic" in type(m).__module__}
    assert quantized == {"Linear", "LSTMCell"}
    assert not any(type(m) in (torch.nn.Linear, torch.nn.LSTMCell) for m in mods)
    assert type(q.model.encoder) is type(fp.model.encoder)  # the CNN stays fp32
    paths = _photos(tmp_path / "p")
    a = [c for _, c, _ in fp.caption_paths(paths, beam=1, workers=0) if c is not None]
    b = [c for _, c, _ in q.caption_paths(paths, beam=1, workers=0) if c is not None]
    same = sum(x.caption == y.caption for x, y in zip(a, b))
    assert same >= len(a) - 1, [(x.caption, y.caption) for x, y in zip(a, b)]
    for x, y in zip(a, b):
        if x.caption == y.caption:
            assert abs(x.score - y.score) < 0.05 * max(1.0, abs(x.score))
            np.testing.assert_allclose(x.attention, y.attention, atol=0.05)


def test_int8_evaluate_keeps_the_scores_close(trained, tmp_path):
    _, run = trained
    m32 = evaluate_checkpoint(run / "best.pt", "test", beam=1, out_dir=tmp_path / "a",
                              device="cpu", meteor=False, progress=False)
    m8 = evaluate_checkpoint(run / "best.pt", "test", beam=1, out_dir=tmp_path / "b",
                             device="cpu", meteor=False, progress=False, int8=True)
    assert m8["int8"] == 1.0 and m32["int8"] == 0.0
    assert abs(m8["BLEU-4"] - m32["BLEU-4"]) < 0.05
    assert abs(m8["grounding"] - m32["grounding"]) < 0.05


def test_cli_int8_and_bad_loader_options(trained, tmp_path, capsys):
    _, run = trained
    _photos(tmp_path / "p", n=2)
    assert main(["-q", "caption", str(tmp_path / "p"), "--checkpoint", str(run / "best.pt"),
                 "--int8", "--device", "cpu"]) == 1  # the one bad file
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 2
    for opt, msg in ((["--workers", "-1"], "--workers must be >= 0"),
                     (["--batch-size", "0"], "--batch-size must be >= 1")):
        assert main(["-q", "caption", str(tmp_path / "p"), "--checkpoint", str(run / "best.pt"),
                     *opt]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0]
