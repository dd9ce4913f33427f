"""progress_bar: a live bar on a terminal, plain lines (no carriage returns) elsewhere."""

from __future__ import annotations

import io
from pathlib import Path

from conftest import tiny_toml
from showattend.progress import LineProgress, progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class _Clock:
    """A fake monotonic clock: each call advances ``step`` seconds."""

    def __init__(self, step: float):
        self.t, self.step = 0.0, step

    def __call__(self) -> float:
        self.t += self.step
        return self.t


def test_terminal_gets_a_tqdm_bar() -> None:
    out = _Terminal()
    for _ in progress_bar(range(5), desc="work", file=out):
        pass
    assert "\r" in out.getvalue() and "5/5" in out.getvalue()


def test_log_gets_lines_every_interval_and_no_carriage_returns() -> None:
    out = io.StringIO()
    bar = LineProgress(range(20), desc="epoch 1", unit="batch", interval=5.0, file=out,
                       clock=_Clock(1.0))
    for _ in bar:
        bar.set_postfix(loss="1.234")
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    # 1 s per item, a line every 5 s: after items 5, 10, 15 and 20, and the closing one
    assert len(lines) == 5, lines
    assert lines[0].startswith("epoch 1: 5/20 batch (25%)") and "loss=1.234" in lines[0]
    assert "ETA" in lines[0] and "batch/s" in lines[0]
    assert lines[-1].startswith("epoch 1: 20/20 batch (100%)") and "total" in lines[-1]


def test_progress_bar_without_terminal_is_line_progress() -> None:
    out = io.StringIO()
    bar = progress_bar(total=3, desc="shapes", unit="img", file=out)
    assert isinstance(bar, LineProgress)
    for _ in range(3):
        bar.update(1)
    bar.close()
    bar.close()  # idempotent, like tqdm
    assert out.getvalue().count("\n") == 1 and out.getvalue().startswith("shapes: 3/3 img (100%)")


def test_short_transient_phase_prints_nothing() -> None:
    out = io.StringIO()
    for _ in progress_bar(range(100), desc="decoding", leave=False, file=out):
        pass
    assert out.getvalue() == ""


def test_long_transient_phase_closes_with_a_line() -> None:
    out = io.StringIO()
    bar = LineProgress(total=4, initial=1, desc="epoch 2", leave=False, interval=1.5, file=out,
                       clock=_Clock(1.0))
    for _ in range(3):
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("epoch 2: 3/4 it (75%)")  # resumed at 1: counts from there
    assert lines[-1].startswith("epoch 2: 4/4 it (100%)") and len(lines) == 2


def test_disabled_prints_nothing_anywhere() -> None:
    for out in (io.StringIO(), _Terminal()):
        for _ in progress_bar(range(10), disable=True, file=out):
            pass
        assert out.getvalue() == ""


def test_training_into_a_log_has_no_carriage_returns(tmp_path: Path, capsys) -> None:
    """A real (tiny) run with progress on, stderr captured (not a terminal): plain lines only."""
    from showattend.config import load_config
    from showattend.train import fit

    cfg_path = tmp_path / "tiny.toml"
    cfg_path.write_text(tiny_toml(tmp_path / "run", tmp_path / "data", n_train=32, n_eval=8,
                                  epochs=1))
    fit(load_config(cfg_path), progress=True, evaluate_test=False)
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "\r" not in captured.out
    assert "shapes: " in captured.err  # the generation phase closed with one line
    epoch_lines = [ln for ln in captured.out.splitlines() if ln.startswith("epoch ")]
    assert len(epoch_lines) == 1  # one summary line per epoch
