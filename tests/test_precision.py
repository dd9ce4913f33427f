"""Precision "auto" | "fp32" | "bf16" (showattend/precision.py): resolution and its warning, the
bf16 products and their gradients, fp32 unchanged, bf16 training that follows fp32, decoding
that agrees, fp32 checkpoints. These run on every host: bf16 works (slowly) without bf16 units;
only speed lives in bench/."""

from __future__ import annotations

import inspect
import json
import warnings
from pathlib import Path

import pytest
import torch

from conftest import signal_at_step, tiny_batch, tiny_model, tiny_toml
from showattend import evaluation, loading
from showattend import precision as P
from showattend.checkpoint import load_checkpoint
from showattend.cli import build_parser, main
from showattend.config import ConfigError, load_config
from showattend.models import packed
from showattend.runtime import autocast
from showattend.train import TrainState, fit, train_step

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _fast(monkeypatch, fast: bool) -> None:
    monkeypatch.setattr(P, "fast_bf16", lambda device_type="cpu", index=0: (
        fast, "CPU with AMX" if fast else "CPU without AMX or AVX512-BF16"))


def test_config_values() -> None:
    assert load_config().train.precision == "fp32" and load_config().eval.precision == "fp32"
    for key in ("train", "eval"):
        for v in ("auto", "fp32", "bf16"):
            assert getattr(load_config(None, [f"{key}.precision={v}"]), key).precision == v
        with pytest.raises(ConfigError, match=rf"{key}.precision = 'fp16': must be one of "
                                              r"auto, fp32, bf16"):
            load_config(None, [f"{key}.precision=fp16"])
    parser = build_parser()
    for argv in (["train", "--config", "x"], ["prepare", "--config", "x"],
                 ["evaluate", "--checkpoint", "x"], ["caption", "a.jpg"], ["inspect", "a.jpg"],
                 ["serve"]):
        assert parser.parse_args(argv + ["--precision", "auto"]).precision == "auto"
        assert parser.parse_args(argv).precision is None  # the config's / checkpoint's
    for fn in (showattend_load(), evaluation.evaluate_checkpoint, evaluation.evaluate_folder):
        assert inspect.signature(fn).parameters["precision"].default is None, fn


def showattend_load():
    import showattend

    return showattend.load


def test_resolution_and_the_warning(monkeypatch, capsys) -> None:
    _fast(monkeypatch, True)
    assert P.resolve("auto", CPU) == "bf16" and P.resolve("bf16", CPU) == "bf16"
    assert P.describe("auto", "bf16", CPU) == "bf16 (auto: CPU with AMX)"
    assert capsys.readouterr().err == ""
    _fast(monkeypatch, False)
    assert P.resolve("auto", CPU) == "fp32" and P.resolve("fp32", CPU) == "fp32"
    assert capsys.readouterr().err == ""
    assert P.resolve("bf16", CPU, "training") == "bf16"  # runs anyway, after one line
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("showattend: warning: precision bf16 for "
                                               "training") and "slower than fp32" in err[0]
    with pytest.raises(P.PrecisionError, match="unknown precision 'fp16'"):
        P.resolve("fp16", CPU)


def test_detection_is_consistent_with_torch() -> None:
    P.fast_bf16.cache_clear()
    fast, why = P.fast_bf16("cpu")
    units = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    assert fast == (units and torch.ops.mkldnn._is_mkldnn_bf16_supported()), why
    assert P.fast_bf16("cuda")[0] == (torch.cuda.is_available() and
                                      torch.cuda.is_bf16_supported())


def test_compute_blocks() -> None:
    for prec, dev in (("fp32", CPU), ("fp32", CUDA)):
        with P.compute(prec, dev):
            assert P.active() is None and not torch.is_autocast_enabled("cpu")
    with P.compute("bf16", CPU):
        outer = P.active()
        assert outer is not None and not torch.is_autocast_enabled("cpu")  # no blanket autocast
        with P.compute("bf16", CPU):
            assert P.active() is outer  # nested blocks share the weight copies
    assert P.active() is None
    with warnings.catch_warnings():  # constructing it on a machine without CUDA warns
        warnings.simplefilter("ignore")
        ctx = autocast("bf16", CUDA)
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16


def _round(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).double()


def _within_bf16(got: torch.Tensor, ref: torch.Tensor) -> bool:
    """got is ref (exact products of bf16 operands, float64) summed in fp32 and the result
    rounded to bf16 (torch's CPU bf16 matmul returns bf16): at most half a bf16 ulp of |ref|
    (bf16 keeps 8 significant bits: unit roundoff 2⁻⁸ relative) plus the fp32 summation error
    (≪ 1e-4 for ≤ 64 terms of size ≤ 20)."""
    return bool(((got.double() - ref).abs() <= ref.abs() * 2.0 ** -8 + 1e-4).all())


def test_bf16_linear_and_its_gradients() -> None:
    """Forward and both gradients are products of bf16-rounded operands (hand-built case)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, 64, generator=g, requires_grad=True)
    w = torch.randn(48, 64, generator=g, requires_grad=True)
    b = torch.randn(48, generator=g, requires_grad=True)
    gy = torch.randn(5, 7, 48, generator=g)
    with P.compute("bf16", CPU):
        y = P.linear(x, w, b)
    assert y.dtype == torch.float32
    y.backward(gy)
    assert _within_bf16(y - b.detach(), _round(x) @ _round(w).t())
    assert _within_bf16(x.grad, _round(gy) @ _round(w))
    assert _within_bf16(w.grad, _round(gy).reshape(-1, 48).t() @ _round(x).reshape(-1, 64))
    assert torch.allclose(b.grad, gy.sum((0, 1)))
    # and it is not the fp32 product: rounding to bf16 moves it by ~2⁻⁹ relative
    assert (y - torch.nn.functional.linear(x, w, b)).abs().max() > 1e-3
    with torch.no_grad():
        assert torch.equal(P.linear(x, w, b), torch.nn.functional.linear(x, w, b))  # no block


def test_fp32_train_step_is_unchanged() -> None:
    cfg = load_config(None, ["train.alpha_c=1.0"])
    imgs, caps = tiny_batch()
    plain, _ = train_step(tiny_model(), imgs, caps, cfg, TrainState())
    with autocast("fp32", CPU):
        wrapped, _ = train_step(tiny_model(), imgs, caps, cfg, TrainState())
    assert torch.equal(plain, wrapped)


def test_bf16_train_step_gradients_follow_fp32() -> None:
    cfg = load_config(None, ["train.alpha_c=1.0"])
    imgs, caps = tiny_batch(b=8, t=9)
    grads, losses = [], []
    for prec in ("fp32", "bf16"):
        model = tiny_model()
        with autocast(prec, CPU):
            loss, _ = train_step(model, imgs, caps, cfg, TrainState())
        loss.backward()
        losses.append(float(loss))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()
                                if p.grad is not None]))
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert abs(losses[0] - losses[1]) < 1e-2 * losses[0] and losses[0] != losses[1]
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], 0)
    assert cos > 0.999, float(cos)


def test_packed_and_plain_bf16_agree(monkeypatch) -> None:
    """The oneDNN-packed bf16 product and the plain one (hosts without oneDNN bf16) compute the
    same rounded products."""
    g = torch.Generator().manual_seed(3)
    w, b, x = torch.randn(96, 80, generator=g), torch.randn(96, generator=g), \
        torch.randn(6, 80, generator=g)
    ref = _round(x) @ _round(w).t()
    assert _within_bf16(packed.PlainBf16(w, b)(x) - b, ref)
    fast = packed.pack(w, None, b, bf16=True)
    assert fast is not None and _within_bf16(fast(x) - b, ref)
    monkeypatch.setattr(packed, "_SUPPORTED_BF16", False)
    assert isinstance(packed.pack(w, None, b, bf16=True), packed.PlainBf16)


def _run(tmp: Path, prec: str) -> Path:
    """The built-in demo model (its config, its sizes) for 200 steps: 4 epochs of 2,000 built-in
    images at batch 40, one thread."""
    out = tmp / prec
    assert main(["-q", "train", "--config", "demo", f"out_dir={out}", f"data.root={tmp / 'data'}",
                 "data.n_train=2000", "data.n_val=50", "data.n_test=200", "train.epochs=4",
                 "train.batch_size=40", "train.val_images=50", "train.threads=1",
                 "train.log_every=1", "eval.meteor=false", "--precision", prec]) == 0
    return out


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The same 200-step demo run in fp32 and in bf16."""
    tmp = tmp_path_factory.mktemp("precision")
    return {p: _run(tmp, p) for p in ("fp32", "bf16")}


def _losses(run: Path) -> list[float]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    return [r["loss"] for r in recs if r["kind"] == "train"]


def test_bf16_training_follows_fp32_over_200_steps(two_runs) -> None:
    """Same batches, same dropout masks; only the products' rounding differs (2⁻⁸ relative per
    operand). The runs drift apart as any two runs do, so the test compares the loss averaged
    over blocks of 20 steps (batch noise ~3 % per step, ~1 % per block): every block within 5 %
    of fp32's, and both curves fall by the same amount."""
    f, b = _losses(two_runs["fp32"]), _losses(two_runs["bf16"])
    assert len(f) == len(b) == 200
    assert f != b  # bf16 really ran: not one of 200 losses identical
    blocks = [(sum(f[i:i + 20]) / 20, sum(b[i:i + 20]) / 20) for i in range(0, 200, 20)]
    worst = max(abs(x - y) / x for x, y in blocks)
    assert worst < 0.05, blocks
    assert blocks[-1][0] < 0.7 * blocks[0][0] and blocks[-1][1] < 0.7 * blocks[0][1], blocks


def test_bf16_decoding_agrees_and_checkpoints_are_fp32(two_runs) -> None:
    """The fp32-trained model decoded in bf16 gives the fp32 captions on ≥ 95 % of the 200
    built-in test images; the bf16 run's checkpoint is an fp32 state dict, precision saved."""
    ck = load_checkpoint(two_runs["bf16"] / "best.pt")
    assert ck["config"]["train"]["precision"] == "bf16"
    assert all(v.dtype == torch.float32 for v in ck["model"].values() if v.is_floating_point())
    model, _vocab, _pre, cfg, _ = loading.load_model(two_runs["fp32"] / "best.pt", CPU)
    from showattend.data.splits import load_splits, make_source

    splits = load_splits(cfg.data, progress=False)
    src = make_source(cfg, splits, splits.test, _pre, model, False, "test", False, "skip")
    res = {p: evaluation.decode_records(model, src, _vocab, CPU, beam=3, progress=False,
                                        precision=p) for p in ("fp32", "bf16")}
    same = sum(x["caption"] == y["caption"] for x, y in zip(res["fp32"], res["bf16"]))
    assert len(res["fp32"]) == 200 and same >= 190, same
    att = max(float(abs(x["alphas"] - y["alphas"]).max())
              for x, y in zip(res["fp32"], res["bf16"]) if x["caption"] == y["caption"])
    assert att < 0.05, att  # the same words look at the same places


def test_bf16_run_resumes_bit_exact_mid_epoch(tmp_path: Path, monkeypatch) -> None:
    """A bf16 run stopped mid-epoch and resumed ends with the uninterrupted run's weights and
    optimiser state, bit for bit (the bf16 weight copies are made afresh every step)."""
    import showattend.train.loop as L

    def cfg_for(out: str):
        path = tmp_path / f"{out}.toml"
        path.write_text(tiny_toml(tmp_path / out, tmp_path / "data", epochs=2, batch_size=8,
                                  train_extra='precision = "bf16"\nthreads = 1'))
        return load_config(path)

    fit(cfg_for("ref"), progress=False, evaluate_test=False)
    real_step = signal_at_step(monkeypatch, 9)  # epoch 2, batch 3 of 6
    assert fit(cfg_for("run"), progress=False, evaluate_test=False).interrupted
    monkeypatch.setattr(L, "train_step", real_step)
    fit(cfg_for("run"), resume=True, progress=False, evaluate_test=False)
    a, b = load_checkpoint(tmp_path / "run" / "last.pt"), load_checkpoint(tmp_path / "ref" /
                                                                          "last.pt")
    assert a["config"]["train"]["precision"] == "bf16"
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for pid, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["optimizer"]["state"][pid][k]), (pid, k)


def test_bf16_decoding_refines_the_top_logits() -> None:
    """bf16 decoding recomputes each row's top logits in fp32 (torch's CPU bf16 product rounds
    its output to bf16, which reordered near-tied beams): those equal the fp32 product to fp32
    summation error, the others keep the bf16 value."""
    from showattend.models.decoder import _refine_top

    g = torch.Generator().manual_seed(7)
    w, b, u = torch.randn(300, 64, generator=g), torch.randn(300, generator=g), \
        torch.randn(5, 64, generator=g)
    rounded = packed.PlainBf16(w, b)(u)  # (5, 300)
    exact = torch.nn.functional.linear(u, w, b)
    refined = _refine_top(rounded.clone(), u, w, b, 16)
    top = rounded.topk(16, dim=1).indices
    assert torch.allclose(refined.gather(1, top), exact.gather(1, top), atol=1e-5, rtol=0)
    rest = torch.ones_like(refined, dtype=torch.bool).scatter_(1, top, False)
    assert torch.equal(refined[rest], rounded[rest])
    assert (rounded.gather(1, top) - exact.gather(1, top)).abs().max() > 1e-3  # it mattered


def test_prepare_in_bf16_marks_the_cache_and_does_not_mix(tmp_path: Path) -> None:
    """`prepare --precision bf16`: a float16 cache marked bf16 in the manifest, close to the fp32
    one (bf16 convolutions: ~2⁻⁸ relative per rounding, a few percent after many layers); an
    fp32 prepare over it is refused without --overwrite, with the difference named."""
    import numpy as np

    from showattend.data.prepared import PreparedDataError
    from showattend.data.prepare import prepare

    def cfg(prec: str, out: str):
        return load_config("demo", [
            f"data.root={tmp_path / 'data'}", f"data.prepared={tmp_path / out}",
            "data.n_train=16", "data.n_val=4", "data.n_test=4", 'encoder.backbone="resnet50"',
            'encoder.weights="none"', "encoder.image_size=64", "encoder.grid=2",
            "encoder.coords=false", f'train.precision="{prec}"'])

    prepare(cfg("fp32", "p32"), workers=0, progress=False)
    res = prepare(cfg("bf16", "p16"), workers=0, progress=False)
    meta = res.manifest["features"]
    assert meta["precision"] == "bf16" and meta["dtype"] == "float16"
    assert "precision" not in json.loads((tmp_path / "p32" / "manifest.json").read_text())[
        "features"]
    f32 = np.load(tmp_path / "p32" / "features.npy").astype(np.float64)
    f16 = np.load(tmp_path / "p16" / "features.npy").astype(np.float64)
    rel = np.abs(f32 - f16).sum() / np.abs(f32).sum()
    assert 0 < rel < 0.05, rel
    with pytest.raises(PreparedDataError, match="precision: bf16 -> fp32.*--overwrite"):
        prepare(cfg("fp32", "p16"), workers=0, progress=False)
    prepare(cfg("fp32", "p16"), workers=0, progress=False, overwrite=True)
    assert "precision" not in json.loads((tmp_path / "p16" / "manifest.json").read_text())[
        "features"]


def test_cli_commands_take_precision(trained, tmp_path, capsys, monkeypatch) -> None:
    """caption / evaluate with --precision bf16 run through and say what they used; auto on a
    host without fast bf16 is fp32 with no warning."""
    tmp, run = trained
    imgs = [str(p) for p in sorted((tmp / "data" / "images" / "test").glob("*.png"))[:2]]
    assert main(["-q", "caption", *imgs, "--checkpoint", str(run), "--precision", "bf16",
                 "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count('"caption"') == 2
    assert main(["-q", "evaluate", "--checkpoint", str(run), "--precision", "bf16", "--out",
                 str(tmp_path / "ev16")]) == 0
    m = json.loads((tmp_path / "ev16" / "metrics_test_beam2.json").read_text())
    assert m["bf16"] == 1.0
    _fast(monkeypatch, False)
    capsys.readouterr()
    assert main(["-q", "evaluate", "--checkpoint", str(run), "--precision", "auto", "--out",
                 str(tmp_path / "ev32")]) == 0
    m = json.loads((tmp_path / "ev32" / "metrics_test_beam2.json").read_text())
    assert m["bf16"] == 0.0 and "warning" not in capsys.readouterr().err
