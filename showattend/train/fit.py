"""``fit``: a training run from start (or resume) to its test evaluation.

    setup_run  →  for each epoch: train_one_epoch → validate → close_epoch  →  evaluate best.pt

Resumable and crash-safe: ``last.pt`` is written atomically at the end of every epoch (and on
SIGINT/SIGTERM, mid-epoch) with model, optimiser, schedule, baseline, RNG state and position in
the epoch, so a resumed run continues exactly where the checkpoint left off. The data order of an
epoch is a pure function of (seed, epoch), which makes resumption bit-identical on CPU.
"""

from __future__ import annotations

import logging

from showattend import config as C
from showattend import distributed as D
from showattend.data.splits import Splits
from showattend.evaluation import evaluate_checkpoint
from showattend.runtime import process_settings
from showattend.train.members import fit_ensemble
from showattend.train.loop import StopFlag, train_one_epoch
from showattend.train.schedule import run_done, set_lr
from showattend.train.setup import Run, setup_run
from showattend.train.state import RunResult
from showattend.train.validation import close_epoch, validate

__all__ = ["fit"]

log = logging.getLogger(__name__)


def fit(cfg: C.Config, resume: bool = False, progress: bool = True,
        splits: Splits | None = None, evaluate_test: bool = True) -> RunResult:
    """Train per ``cfg`` into cfg.out_dir; evaluate the best checkpoint on the test split.

    The process-wide torch settings a run changes (threads, deterministic algorithms, flushing
    denormals) are restored on return, so calling ``fit`` from a notebook, an API user's program
    or a test session leaves the caller's numerics as they were.
    """
    if cfg.decoder.ensemble > 1:  # N members one after another, joined (train/members.py)
        return fit_ensemble(cfg, fit, resume, progress, splits, evaluate_test)
    with process_settings():
        try:
            run = setup_run(cfg, resume, progress, splits)
            progress = progress and run.dist.main
            result = _train(run, progress)
            if evaluate_test and run.dist.main and not result.interrupted \
                    and (run.files.out / "best.pt").is_file():
                result.test_metrics = evaluate_checkpoint(
                    run.files.out / "best.pt", "test", out_dir=run.files.out, splits=run.splits,
                    progress=progress, summary=True,
                    precision=run.cfg.train.precision)  # a bf16 run is tested in bf16
            return result
        finally:
            D.teardown(D.from_env())


def _train(run: Run, progress: bool) -> RunResult:
    """The epochs of a run; stops at ``train.epochs``, early stopping or a signal."""
    cfg, state = run.cfg, run.state
    result = RunResult(run.files.out)
    with StopFlag() as stop:
        # the early-stop test is repeated here so that resuming a run that stopped early (and
        # was then killed during its test evaluation) does not train on
        while not run_done(state, cfg.train):
            set_lr(run.optimizer, state.decays, cfg.train)
            if not train_one_epoch(run.train_model, run.optimizer, run.train_ds, cfg, state,
                                   run.device, run.files.log, stop, run.save, progress, run.dist,
                                   run.objective):
                result.interrupted, result.last = True, run.files.out / "last.pt"
                log.warning("interrupted by signal %s: saved %s", stop.signum,
                            run.files.out / "last.pt")
                break
            if close_epoch(run, validate(run, progress), progress):
                break
            if D.any_flag(stop.signum is not None, run.dist):
                result.interrupted, result.last = True, run.files.out / "last.pt"
                break
    result.epochs = state.epoch
    result.train_seconds = state.elapsed
    if state.bad_images:
        log.warning("skipped %d unreadable images during training", state.bad_images)
    return result
