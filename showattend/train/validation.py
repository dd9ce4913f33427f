"""Validation after each epoch, and model selection on its metric."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from showattend import distributed as D
from showattend.evaluation import decode_records, score_results
from showattend.progress import write
from showattend.train.schedule import record_validation, should_stop
from showattend.train.setup import Run

__all__ = ["validate", "close_epoch", "epoch_line", "keep_snapshots", "snapshot_paths"]

log = logging.getLogger(__name__)


def validate(run: Run, progress: bool) -> dict[str, float]:
    """Free-running decoding of the validation images (each rank its share), scored on rank 0
    and shared with every rank."""
    cfg, dist = run.cfg, run.dist
    val_res = decode_records(run.model, run.val_src, run.vocab, run.device,
                             beam=cfg.train.val_beam, max_len=cfg.eval.max_len,
                             batch_size=cfg.eval.batch_size, progress=progress,
                             precision=cfg.train.precision, length_norm=cfg.eval.length_norm,
                             no_repeat_ngram=cfg.eval.no_repeat_ngram)
    for r in val_res:  # shard index → index into val_recs
        r["index"] = r["index"] * dist.world + dist.rank
    val_res = D.gather(val_res, dist)
    val = score_results(val_res, run.val_recs, run.splits.objects.get("val"), meteor=False,
                        photos=run.val_photos) if dist.main else None
    return D.broadcast(val, dist)


def epoch_line(epoch: int, metric: str, val: dict[str, float], best: float, best_epoch: int,
               elapsed: float, epoch_seconds: float | None = None, epochs: int = 0) -> str:
    """The epoch's one progress line: the selection metric, then the built-in data's grounding
    (known objects) and the photos' box measures where they exist — a photo run has no
    built-in grounding, and "nan" would say nothing — then the time: this epoch's, the
    training time so far, and at this pace the time left for ``epochs`` epochs."""
    shown = "".join(f"{k} {val[k]:.3f}, " for k in ("grounding", "correctness", "pointing")
                    if k in val and math.isfinite(val[k]))
    took = f"epoch {_clock(epoch_seconds)}, " if epoch_seconds is not None else ""
    left = ""
    if epochs > epoch and epoch > 0:
        left = f", about {_clock(elapsed / epoch * (epochs - epoch))} left for {epochs} epochs"
    return (f"epoch {epoch}: val {metric} {val.get(metric, 0.0):.4f} (best {best:.4f} @ "
            f"{best_epoch}), {shown}{took}training {_clock(elapsed)} in all{left}")


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


def close_epoch(run: Run, val: dict[str, float], progress: bool) -> bool:
    """Book the epoch's validation (best, plateau, decays), log it, write best.pt (when it is
    the best) and last.pt, draw the curves. Returns whether to stop early."""
    cfg, state = run.cfg, run.state
    metric = val.get(cfg.train.val_metric, 0.0)
    improved = record_validation(state, metric, cfg.train)
    run.files.log({"kind": "val", "epoch": state.epoch, "step": state.step,
                   "lr": run.optimizer.param_groups[0]["lr"], "elapsed": round(state.elapsed, 2),
                   **{f"val_{k}": v for k, v in val.items()}})
    # best.pt first: a crash between the two saves then re-runs this epoch on resume and
    # rewrites both, whereas the other order would leave a stale best.pt for good.
    if improved:
        run.save("best.pt")
    run.save("last.pt")
    if cfg.train.snapshots > 1:
        keep_snapshots(run)
    run.files.plot()
    if progress:
        took = (None if run.elapsed_at_last_epoch is None and state.epoch > 1 else
                state.elapsed - (run.elapsed_at_last_epoch or 0.0))  # unknown on a resume
        write(epoch_line(state.epoch, cfg.train.val_metric, val, state.best, state.best_epoch,
                         state.elapsed, took, cfg.train.epochs))
    run.elapsed_at_last_epoch = state.elapsed
    if should_stop(state, cfg.train):
        log.info("early stop: no improvement in %d epochs", state.bad_epochs)
        return True
    return False


def keep_snapshots(run: Run) -> None:
    """train.snapshots = K: write this epoch's model as epoch<k>.pt and delete the snapshots no
    snapshot ensemble can use any more (those more than K − 1 epochs before the best: the best
    epoch only moves forward)."""
    state, k = run.state, run.cfg.train.snapshots
    run.save(f"epoch{state.epoch}.pt", full=False)
    if run.dist.main:
        for old in run.files.out.glob("epoch*.pt"):
            n = old.stem[len("epoch"):]
            if n.isdigit() and int(n) <= state.best_epoch - k:
                old.unlink(missing_ok=True)


def snapshot_paths(out: Path, best_epoch: int, snapshots: int) -> list[Path]:
    """The snapshots that join a run's best.pt in a snapshot ensemble: epoch<b−1>.pt back to
    epoch<b−K+1>.pt, those that exist (a run whose best epoch is its first has none)."""
    return [p for j in range(best_epoch - 1, best_epoch - snapshots, -1)
            if (p := out / f"epoch{j}.pt").is_file()]

