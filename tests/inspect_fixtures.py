"""Fixtures of the inspection tests: a small soft and a small hard run on the same built-in data.

The session's two-epoch ``trained`` run ends most captions at once (empty captions), which leaves
a viewer nothing to show; these runs train just long enough (~100 steps, about half a minute on a
2-core machine) to write real captions with attention that moves from word to word. The hard run
starts from the soft one (``hard.warm_start``) and trains a few REINFORCE steps on top.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

N_TRAIN = 192  # 6 batches of 32 per epoch


def _overrides(out: Path, data: Path, kind: str, epochs: int) -> list[str]:
    ov = [f"out_dir={out}", f"data.root={data}", f"data.n_train={N_TRAIN}", "data.n_val=16",
          "data.n_test=16", "data.seed=0", "encoder.channels=32", "attention.dim=32",
          f"attention.kind={kind}", "decoder.embed_dim=32", "decoder.hidden_dim=96",
          "decoder.dropout=0.0", f"train.epochs={epochs}", "train.batch_size=32",
          "train.lr=3e-3", "train.alpha_c=0.0", "train.val_images=16", "train.early_stop=0",
          "train.log_every=1000", "train.seed=0", "train.device=cpu", "train.threads=1",
          "eval.beam=2", "eval.meteor=false"]
    if kind == "hard":
        ov += ["hard.mix_mode=sample", "hard.mix_prob=0.5", "attention.test_mode=argmax",
               f"hard.warm_start={out.parent / 'run_soft' / 'best.pt'}"]
    return ov


@pytest.fixture(scope="session")
def soft_hard(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(data dir, soft run, hard run)."""
    import showattend.metrics
    import showattend.train as T
    import showattend.train.run_files as RF
    from showattend import config as C

    tmp = tmp_path_factory.mktemp("inspect_runs")
    data = tmp / "data"
    mp = pytest.MonkeyPatch()
    warned = set(showattend.metrics._WARNED)
    try:
        mp.setattr(RF, "plot_run", lambda *a, **k: None)  # matplotlib curves: seconds per epoch
        mp.setattr(showattend.metrics, "_java_available", lambda: False)  # no JVM per epoch
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "Java not found": we said so
            for kind, epochs in (("soft", 16), ("hard", 4)):
                cfg = C.load_config(None, _overrides(tmp / f"run_{kind}", data, kind, epochs))
                T.fit(cfg, progress=False)
    finally:
        mp.undo()
        # the no-Java warning stays due for tests that check it
        showattend.metrics._WARNED.clear()
        showattend.metrics._WARNED.update(warned)
    return data, tmp / "run_soft", tmp / "run_hard"


@pytest.fixture(scope="session")
def test_images(soft_hard) -> list[Path]:
    data, _, _ = soft_hard
    return sorted((data / "images" / "test").glob("*.png"))
