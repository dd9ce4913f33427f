"""The training engine's rooms, one at a time: schedule and model selection, objective choice,
an objective plugged into the loop without touching it, the run folder's log on resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import showattend.train.run_files as RF
from conftest import tiny_batch, tiny_model, tiny_toml
from showattend import config as C
from showattend import distributed as D
from showattend.config import Config, load_config
from showattend.losses import masked_cross_entropy
from showattend.train import fit
from showattend.train.objectives import (OBJECTIVES, CrossEntropy, HardAttention, Objective,
                                         objective_for, train_step)
from showattend.train.schedule import record_validation, should_stop
from showattend.train.state import TrainState


def test_record_validation_books_best_plateau_decays_and_early_stop():
    cfg = replace_train(lr_patience=2, early_stop=3)
    s = TrainState()
    seen = [record_validation(s, m, cfg) for m in (0.5, 0.6, 0.6, 0.55, 0.7, 0.1, 0.1)]
    assert seen == [True, True, False, False, True, False, False]  # ties are no improvement
    assert (s.epoch, s.best, s.best_epoch, s.batch_in_epoch) == (7, 0.7, 5, 0)
    assert s.decays == 2 and s.since_decay == 0  # epochs 3-4, then 6-7: two plateaus of 2
    assert not should_stop(s, cfg)
    record_validation(s, 0.0, cfg)
    assert s.bad_epochs == 3 and should_stop(s, cfg)
    assert not should_stop(s, replace_train(early_stop=0))  # 0 = never


def replace_train(**kw) -> C.TrainConfig:
    return C.replace(Config(), train=kw).train


def test_objective_for_picks_by_model_kind():
    assert type(objective_for(Config(), tiny_model("soft"))) is CrossEntropy
    assert type(objective_for(Config(), tiny_model("hard"))) is HardAttention
    for cls in OBJECTIVES:
        assert cls.name and "loss" in cls.curve_keys


def test_train_step_uses_the_given_objective_and_passes_image_ids():
    model = tiny_model("soft")
    imgs, caps = tiny_batch()
    seen = {}

    class Probe(Objective):
        name = "probe"

        def applies_to(self, model):
            return True

        def loss(self, model, imgs, caps, state, *, stats=False, features=False, image_ids=None):
            seen["ids"] = image_ids
            out = model(imgs, caps)
            return out.logits.float().pow(2).mean(), {"loss": 0.0}

    ids = torch.arange(len(caps))
    loss, rec = train_step(model, imgs, caps, Config(), TrainState(), image_ids=ids,
                           objective=Probe(Config()))
    assert seen["ids"] is ids and rec == {"loss": 0.0} and loss.requires_grad
    # and without one, the model's own objective: the cross-entropy + penalty of the soft model
    loss2, rec2 = train_step(model, imgs, caps, Config(), TrainState())
    assert set(rec2) == {"loss", "ce", "ds"} and math.isclose(float(loss2), rec2["loss"])


def test_a_new_objective_trains_a_run_without_touching_the_loop(tmp_path, monkeypatch):
    """An objective that weights the penalty 0 and logs its own key: fit() uses it, logs the key,
    and the curves get it, with no change in the loop (the objective is a unit)."""
    calls = []

    class NoPenalty(CrossEntropy):
        name = "no_penalty"
        curve_keys = ("loss", "ce", "my_key")

        def applies_to(self, model):
            return not model.stochastic

        def bind(self, data):
            calls.append(("bind", len(data.records), data.grid))
            self.bound = True

        def loss(self, model, imgs, caps, state, **kw):
            calls.append(("loss", getattr(self, "bound", False)))
            loss, rec = super().loss(model, imgs, caps, state, **kw)
            return loss, {**rec, "my_key": 1.0}

    monkeypatch.setattr("showattend.train.objectives.OBJECTIVES", (NoPenalty, HardAttention))
    plotted = []
    monkeypatch.setattr(RF, "plot_run", lambda log, out, keys: plotted.append(keys))
    cfg_path = tmp_path / "t.toml"
    cfg_path.write_text(tiny_toml(tmp_path / "run", tmp_path / "data", n_train=16, n_eval=4, batch_size=8,
                                  epochs=1))
    fit(load_config(cfg_path), progress=False, evaluate_test=False)
    assert calls[0][0] == "bind" and calls[0][1] == 16 and calls[0][2] == (8, 8)
    assert calls[1:] == [("loss", True)] * (len(calls) - 1) and len(calls) > 2  # the bound one
    log = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["my_key"] == 1.0 for r in log if r["kind"] == "train")
    assert plotted and "my_key" in plotted[-1] and "grad_norm" in plotted[-1]


def test_run_files_keep_the_log_up_to_the_resumed_step(tmp_path: Path):
    files = RF.RunFiles(tmp_path, D.SINGLE)
    for step in (1, 2, 3):
        files.log({"kind": "train", "epoch": 0, "step": step})
    files.log({"kind": "val", "epoch": 1, "step": 3})
    (tmp_path / "metrics.jsonl").open("a").write('{"kind": "tra')  # a line cut by a crash
    files.start(C.to_dict(Config()), Config(), TrainState(epoch=0, step=2))
    assert [r["step"] for r in RF.read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]
    assert json.loads((tmp_path / "config.json").read_text())["train"]["lr"] == Config().train.lr
    files.start(C.to_dict(Config()), Config(), None)  # a new run starts a new log
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_objectives_give_finite_losses_and_their_records(kind):
    model = tiny_model(kind)
    imgs, caps = tiny_batch(b=8)
    obj = objective_for(C.replace(Config(), hard={"mix_mode": "off"}), model)
    loss, rec = obj.loss(model, imgs, caps, TrainState())
    assert torch.isfinite(loss) and set(rec) <= set(obj.curve_keys) | {"soft_batch"}


def test_label_smoothing_is_the_smoothed_target_cross_entropy_of_the_objective():
    """ε = 0.2 over V words: loss = (1 − ε)·NLL + ε·mean_v(−log p_v) per real token, by hand in
    float64; the cross-entropy objective uses it (config key), ε = 0 is the plain NLL."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7, dtype=torch.float64)
    targets = torch.tensor([[3, 1, 0], [5, 0, 0]])  # 0 = <pad>
    logp = torch.log_softmax(logits, -1)
    eps, mask = 0.2, targets != 0
    want = -(1 - eps) * logp.gather(-1, targets[..., None])[..., 0] - eps * logp.mean(-1)
    want = (want * mask).sum() / mask.sum()
    assert math.isclose(float(masked_cross_entropy(logits, targets, eps)), float(want), rel_tol=1e-12)
    plain = -(logp.gather(-1, targets[..., None])[..., 0] * mask).sum() / mask.sum()
    assert math.isclose(float(masked_cross_entropy(logits, targets)), float(plain), rel_tol=1e-12)
    # through the objective: the same model and batch, ε from the config
    model = tiny_model("soft").eval()
    imgs, caps = tiny_batch(b=4)
    ce = {}
    for e in (0.0, 0.1):
        cfg = C.replace(Config(), train={"label_smoothing": e})
        _, rec = objective_for(cfg, model).loss(model, imgs, caps, TrainState())
        ce[e] = rec["ce"]
    with torch.no_grad():
        out = model(imgs, caps)
    assert math.isclose(ce[0.0], float(masked_cross_entropy(out, caps[:, 1:])), rel_tol=1e-5)
    assert math.isclose(ce[0.1], float(masked_cross_entropy(out, caps[:, 1:], 0.1)), rel_tol=1e-5)
    assert ce[0.1] > ce[0.0]  # smoothing adds the (larger) mean over all words


@pytest.mark.parametrize("bad,msg", [({"train": {"label_smoothing": 1.0}}, "in [0, 1)"),
                                     ({"train": {"label_smoothing": 0.1},
                                       "attention": {"kind": "hard"}}, "cross-entropy objective")])
def test_label_smoothing_bad_values_are_refused(bad, msg):
    with pytest.raises(C.ConfigError, match=msg.replace("[", r"\[").replace(")", r"\)")):
        C.validate(C.replace(Config(), **bad))


def test_epoch_line_shows_the_measures_a_run_has_and_no_nan():
    from showattend.train.validation import epoch_line
    photo = {"BLEU-4": 0.1725, "grounding": float("nan"), "correctness": 0.7241,
             "pointing": 0.819}
    assert epoch_line(1, "BLEU-4", photo, 0.1725, 1, 334.4, 334.4, 3) == (
        "epoch 1: val BLEU-4 0.1725 (best 0.1725 @ 1), correctness 0.724, pointing 0.819, "
        "epoch 5 min 34 s, training 5 min 34 s in all, about 11 min 09 s left for 3 epochs")
    assert epoch_line(3, "CIDEr", {"CIDEr": 2.5, "grounding": 0.9}, 2.6, 2, 10) == (
        "epoch 3: val CIDEr 2.5000 (best 2.6000 @ 2), grounding 0.900, training 10 s in all")
