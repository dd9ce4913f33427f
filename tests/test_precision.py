"""train.precision: fp32 (default, unchanged) or bf16 autocast on CUDA; refused on CPU; device
"auto" everywhere."""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from conftest import tiny_batch, tiny_model, tiny_toml
from showattend import evaluation, loading, runtime
from showattend.cli import build_parser, main
from showattend.config import ConfigError, load_config
from showattend.runtime import autocast
from showattend.train import TrainingError, TrainState, fit, train_step

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_precision_config_values(tmp_path: Path) -> None:
    assert load_config().train.precision == "fp32"
    assert load_config(None, ["train.precision=bf16"]).train.precision == "bf16"
    with pytest.raises(ConfigError, match=r"train.precision = 'fp16': must be one of fp32, bf16"):
        load_config(None, ["train.precision=fp16"])


def test_autocast_helper() -> None:
    for precision, device in (("fp32", CPU), ("fp32", CUDA), ("bf16", CPU)):
        ctx = autocast(precision, device)
        assert not isinstance(ctx, torch.autocast), (precision, device)
        with ctx:
            assert not torch.is_autocast_enabled("cpu")
    with warnings.catch_warnings():  # constructing it on a machine without CUDA warns
        warnings.simplefilter("ignore")
        ctx = autocast("bf16", CUDA)
    assert isinstance(ctx, torch.autocast)
    assert ctx.device == "cuda" and ctx.fast_dtype == torch.bfloat16


def test_fp32_train_step_is_unchanged() -> None:
    cfg = load_config(None, ["train.alpha_c=1.0"])
    imgs, caps = tiny_batch()
    model = tiny_model()
    plain, _ = train_step(model, imgs, caps, cfg, TrainState())
    with autocast(cfg.train.precision, CPU):
        wrapped, _ = train_step(model, imgs, caps, cfg, TrainState())
    assert plain.dtype == wrapped.dtype == torch.float32
    assert torch.equal(plain, wrapped)


def test_bf16_training_on_cpu_is_refused(tmp_path: Path, capsys) -> None:
    cfg_path = tmp_path / "tiny.toml"
    cfg_path.write_text(tiny_toml(tmp_path / "run", tmp_path / "data", epochs=1,
                                  train_extra='precision = "bf16"\ndevice = "cpu"'))
    with pytest.raises(TrainingError, match="needs a CUDA device, but this run is on cpu"):
        fit(load_config(cfg_path), progress=False)
    assert not (tmp_path / "run" / "last.pt").exists()
    assert main(["-q", "train", "--config", str(cfg_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.precision=fp32" in err[0]


def test_bf16_paths_run_under_autocast(tmp_path: Path, monkeypatch) -> None:
    """The code a bf16 run takes on CUDA, exercised here with CPU autocast standing in for it:
    training, validation, test decoding and the API all run under the helper, and bf16 outputs
    (which numpy cannot hold) come back as float32 arrays."""
    import showattend

    calls = []

    def cpu_autocast(precision: str, device: torch.device):
        calls.append(precision)
        if precision == "bf16":
            return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    monkeypatch.setattr(runtime, "autocast", cpu_autocast)
    monkeypatch.setattr(runtime, "check_precision", lambda precision, device: None)
    cfg_path = tmp_path / "tiny.toml"
    cfg_path.write_text(tiny_toml(tmp_path / "run", tmp_path / "data", n_train=32, n_eval=8,
                                  epochs=1, train_extra='precision = "bf16"'))
    result = fit(load_config(cfg_path), progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    steps = sum(r["kind"] == "train" for r in log)  # log_every = 1: one record per step
    # every train step, plus one batch each of validation and test decoding (8 images each)
    assert steps >= 2 and calls == ["bf16"] * (steps + 2)
    assert math.isfinite(result.test_metrics["BLEU-4"])
    before = len(calls)
    cap = showattend.load(tmp_path / "run" / "best.pt", device="cpu")
    images = sorted((tmp_path / "data" / "images" / "test").glob("*.png"))[:2]
    for c in cap.caption(images, beam=2):
        assert str(c.attention.dtype) == "float32" and str(c.beta.dtype) == "float32"
        assert abs(c.attention.sum(axis=(1, 2)) - 1).max() < 0.02  # bf16 softmax, rounded
    assert calls[before:] == ["bf16"]  # the API decoded (one batch) under the helper too


def test_device_defaults_are_auto() -> None:
    from showattend.api import CaptionerAPI, load

    assert load_config().train.device == "auto"
    parser = build_parser()
    for argv in (["evaluate", "--checkpoint", "x"], ["caption", "a.jpg", "--checkpoint", "x"]):
        assert parser.parse_args(argv).device == "auto"
    for fn in (load, CaptionerAPI.load, loading.load_model):
        assert inspect.signature(fn).parameters["device"].default == "auto", fn
    # evaluate_checkpoint: None means "auto"
    assert inspect.signature(evaluation.evaluate_checkpoint).parameters["device"].default is None
