"""Training an ensemble from one config: ``decoder.ensemble = N`` in a training config.

    member 0 (train.seed = s)  →  …  →  member N−1 (seed s + N − 1)  →  join  →  evaluate best.pt

Each member is an ordinary run of the same model in ``<out_dir>/member<i>/`` (its own
``last.pt``, ``best.pt``, log and curves), trained one after another with seed ``s + i``. The
members' best checkpoints are then joined (showattend/ensemble.py) into ``<out_dir>/best.pt``,
which decodes as one model, and that file is evaluated on the test split. ``--resume`` continues
the member that was interrupted and leaves finished members as they are (resuming a finished run
trains nothing), so a killed ensemble run loses at most the epoch in progress.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from showattend import config as C
from showattend import distributed as D
from showattend.data.splits import Splits
from showattend.ensemble import join_checkpoints, joinable
from showattend.evaluation import evaluate_checkpoint
from showattend.models.backbones import get_backbone
from showattend.runtime import TrainingError
from showattend.train.state import RunResult

__all__ = ["fit_ensemble", "member_configs"]

log = logging.getLogger(__name__)


def member_configs(cfg: C.Config) -> list[C.Config]:
    """The configs of the N members of ``cfg`` (decoder.ensemble = N): one model, seeds s + i,
    each in its own directory under cfg.out_dir."""
    out = Path(cfg.out_dir)
    return [C.replace(cfg, decoder={"ensemble": 1}, train={"seed": cfg.train.seed + i},
                      out_dir=str(out / f"member{i}"), name=f"{cfg.name}_m{i}")
            for i in range(cfg.decoder.ensemble)]


def _check_shared_encoder(cfg: C.Config) -> None:
    """Refuse, before any training, an ensemble whose members could not decode as one: they
    must be deterministic soft-attention models on one frozen encoder (the join checks it too,
    but only after every member has trained)."""
    if not joinable(cfg):
        raise C.ConfigError(f"decoder.ensemble > 1: ensembles are built from soft-attention "
                            f"models without self-attention layers (attention.kind "
                            f"{cfg.attention.kind!r})")
    if not get_backbone(cfg.encoder.backbone).pretrained or cfg.encoder.fine_tune_blocks > 0:
        raise C.ConfigError(f"decoder.ensemble > 1: the members must share one frozen encoder, "
                            f"but encoder.backbone {cfg.encoder.backbone!r} with "
                            f"fine_tune_blocks {cfg.encoder.fine_tune_blocks} trains it")
    if cfg.encoder.weights == "none" and not cfg.data.prepared:
        raise C.ConfigError("decoder.ensemble > 1: encoder.weights = 'none' without a feature "
                            "cache (data.prepared) gives each member its own random encoder")


def fit_ensemble(cfg: C.Config, fit_one: Callable[..., RunResult], resume: bool, progress: bool,
                 splits: Splits | None, evaluate_test: bool) -> RunResult:
    """Train the members of ``cfg`` with ``fit_one`` (train.fit), join them, test the ensemble."""
    _check_shared_encoder(cfg)
    if D.from_env().enabled:
        raise C.ConfigError("decoder.ensemble > 1 trains its members one after another in one "
                            "process; under torchrun, train each member with its own train.seed "
                            "and join them with `showattend ensemble`")
    out = Path(cfg.out_dir)
    members = member_configs(cfg)
    if resume and not any((Path(m.out_dir) / "last.pt").is_file() for m in members):
        raise TrainingError(f"--resume: no member checkpoint {out / 'member0' / 'last.pt'}")
    result = RunResult(out)
    best = []
    for i, mcfg in enumerate(members):
        mout = Path(mcfg.out_dir)
        again = resume and (mout / "last.pt").is_file()
        log.info("ensemble member %d of %d (train.seed %d): %s%s", i + 1, cfg.decoder.ensemble,
                 mcfg.train.seed, mout, " (resumed)" if again else "")
        r = fit_one(mcfg, resume=again, progress=progress, splits=splits, evaluate_test=False)
        result.epochs += r.epochs
        result.train_seconds += r.train_seconds
        if r.interrupted:
            result.interrupted, result.last = True, r.last
            return result
        if not (mout / "best.pt").is_file():
            raise TrainingError(f"ensemble member {mout} ended without a best.pt")
        best.append(mout / "best.pt")
    join_checkpoints(best, out / "best.pt", name=cfg.name)
    log.info("joined %d members into %s", len(best), out / "best.pt")
    if evaluate_test:
        result.test_metrics = evaluate_checkpoint(
            out / "best.pt", "test", out_dir=out, splits=splits, progress=progress,
            summary=True, precision=cfg.train.precision)
    return result
