"""Config: TOML loading, dotted overrides, unknown keys, round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from showattend.config import Config, ConfigError, load_config, to_toml

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_round_trip(path, tmp_path):
    cfg = load_config(path)
    (tmp_path / "r.toml").write_text(to_toml(cfg))
    assert load_config(tmp_path / "r.toml") == cfg


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["--train.lr=4e-4", "encoder.backbone=resnet152", "train.epochs=3",
                             "decoder.deep_output=false", 'name="x y"'])
    assert cfg.train.lr == 4e-4 and cfg.encoder.backbone == "resnet152"
    assert cfg.train.epochs == 3 and cfg.decoder.deep_output is False and cfg.name == "x y"
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0  # int accepted for a float


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown config key train.lrr"),
    ("bogus.x=1", "unknown config key bogus"),
    ("train.epochs=2.5", "train.epochs: expected int"),
    ("train.epochs=0", "train.epochs must be > 0"),
    ("attention.window=2", "attention.window must be a positive odd"),
    ("attention.window=-1", "attention.window must be a positive odd"),
    ("hard.baseline_decay=1.5", "hard.baseline_decay"),
    ("attention.score=dot", "attention.score"),
    ("train", "must look like section.key=value"),
])
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_defaults_are_a_valid_config():
    assert load_config(None) == Config()
