"""Shared fixtures: tiny models and tiny generated datasets (nothing downloaded)."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from showattend.models.captioner import Captioner
from showattend.models.encoder import build_encoder

# The tests' tensors are tiny: one thread avoids intra-op scheduling that costs more than the
# arithmetic (10–15× slower with 2 threads on a loaded 2-core machine). Runs that set
# train.threads still change it and restore it (tests/test_robustness.py checks that).
# SHOWATTEND_TEST_THREADS=n runs the suite on n threads instead: the tolerances must hold for
# any thread count (tests/tolerances.py), and this is how that is checked.
torch.set_num_threads(int(os.environ.get("SHOWATTEND_TEST_THREADS", "1")))


def tiny_model(attention: str = "soft", score: str = "additive", vocab_size: int = 20,
               window: int = 1, seed: int = 0, beta: str = "scalar", dropout: float = 0.0) -> Captioner:
    """A ~30k-parameter captioner on 32×32 inputs with a 4×4 grid."""
    torch.manual_seed(seed)
    enc = build_encoder("shapes_cnn", grid=4, channels=16, coords=True)
    return Captioner.build(enc, vocab_size, attention=attention, score=score, attn_dim=16,
                           window=window, embed_dim=16, hidden_dim=32, dropout=dropout, beta=beta)


def tiny_batch(b: int = 4, t: int = 7, vocab_size: int = 20, seed: int = 1):
    """Images (B, 3, 32, 32) and captions <start> w… <end> <pad>… (B, T)."""
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(b, 3, 32, 32, generator=g)
    caps = torch.randint(4, vocab_size, (b, t), generator=g)
    caps[:, 0] = 1
    for i in range(b):  # different lengths, padded
        end = t - 1 - (i % 3)
        caps[i, end] = 2
        caps[i, end + 1:] = 0
    return imgs, caps


@pytest.fixture
def shapes_dir(tmp_path_factory):
    """A small built-in dataset generated once per test session."""
    from showattend.data.shapes import generate_shapes

    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, n_train=64, n_val=16, n_test=16, seed=3, progress=False)
    return root


TINY = """
name = "tiny"
out_dir = "{out}"
[data]
kind = "shapes"
root = "{data}"
n_train = {n_train}
n_val = {n_eval}
n_test = {n_eval}
seed = 5
[encoder]
channels = 16
[attention]
dim = 16
kind = "{kind}"
[decoder]
embed_dim = 16
hidden_dim = 32
[train]
epochs = {epochs}
batch_size = {batch_size}
val_beam = 1
log_every = 1
{train_extra}
[eval]
beam = {beam}
meteor = false
batch_size = 8
"""


def tiny_toml(out, data, kind: str = "soft", n_train: int = 48, n_eval: int = 12, epochs: int = 2,
              batch_size: int = 16, beam: int = 2, train_extra: str = "") -> str:
    """TOML of a tiny run (a 16-channel model on a few dozen built-in images)."""
    return TINY.format(out=out, data=data, kind=kind, n_train=n_train, n_eval=n_eval,
                       epochs=epochs, batch_size=batch_size, beam=beam, train_extra=train_extra)


def write_config(tmp_path, kind: str = "soft", data=None):
    """A tiny TOML run config (48 training images, 2 epochs) in tmp_path."""
    cfg = tmp_path / f"tiny_{kind}.toml"
    cfg.write_text(tiny_toml(tmp_path / f"run_{kind}", data or tmp_path / "data", kind=kind))
    return cfg


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """(tmp dir, run dir) of a tiny soft model trained once through the CLI."""
    from showattend.cli import main

    tmp = tmp_path_factory.mktemp("cli")
    cfg = write_config(tmp)
    assert main(["-q", "train", "--config", str(cfg)]) == 0
    return tmp, tmp / "run_soft"


def signal_at_step(monkeypatch, n: int, sig: int = signal.SIGTERM):
    """Make the n-th training step (counted from now) send ``sig`` to this process — a run
    interrupted mid-epoch; returns the real ``train_step`` to put back for the resume."""
    import showattend.train.loop as L

    real, calls = L.train_step, {"n": 0}

    def step(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), sig)
        return real(*a, **k)

    monkeypatch.setattr(L, "train_step", step)
    return real
