"""Training an ensemble from one config: ``decoder.ensemble = N`` in a training config.

    member 0 (train.seed = s)  →  …  →  member N−1 (seed s + N − 1)  →  join  →  evaluate best.pt

Each member is an ordinary run of the same model in ``<out_dir>/member<i>/`` (its own
``last.pt``, ``best.pt``, log and curves), trained one after another with seed ``s + i``. The
members' best checkpoints are then joined (showattend/ensemble.py) into ``<out_dir>/best.pt``,
which decodes as one model, and that file is evaluated on the test split. ``--resume`` continues
the member that was interrupted and leaves finished members as they are (resuming a finished run
trains nothing), so a killed ensemble run loses at most the epoch in progress.

``train.member_jobs = J > 1`` trains the unfinished members J at a time, each in a process of its
own with the threads split between them (``train.threads``, or torch's count, divided by the
members running together). Each member is the same run of the same config and seed, only in
another process; at the same thread count its weights are bit-identical to one trained in turn
(tested), while another thread count can change the last digits, as ``train.threads`` can.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
from pathlib import Path
from typing import Any, Callable

import torch

from showattend import config as C
from showattend import distributed as D
from showattend.data.splits import Splits
from showattend.checkpoint import load_checkpoint
from showattend.ensemble import join_checkpoints, joinable
from showattend.evaluation import evaluate_checkpoint
from showattend.models.backbones import get_backbone
from showattend.runtime import TrainingError
from showattend.train.schedule import run_done
from showattend.train.state import RunResult, TrainState
from showattend.train.validation import snapshot_paths

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
        raise C.ConfigError("decoder.ensemble > 1 is not trained under torchrun: train each "
                            "member with its own train.seed and join them with `showattend "
                            "ensemble`")
    out = Path(cfg.out_dir)
    members = member_configs(cfg)
    if resume and not any((Path(m.out_dir) / "last.pt").is_file() for m in members):
        raise TrainingError(f"--resume: no member checkpoint {out / 'member0' / 'last.pt'}")
    result = RunResult(out)
    runs = _train_members(members, fit_one, resume, progress, splits, cfg.train.member_jobs)
    best = []
    for mcfg, r in zip(members, runs):
        result.epochs += r.epochs
        result.train_seconds += r.train_seconds
        if r.interrupted:
            result.interrupted, result.last = True, r.last
    if result.interrupted:
        return result
    for mcfg in members:
        mout = Path(mcfg.out_dir)
        if not (mout / "best.pt").is_file():
            raise TrainingError(f"ensemble member {mout} ended without a best.pt")
        best.append(mout / "best.pt")
        if cfg.train.snapshots > 1:
            best += snapshot_paths(mout, _best_epoch(mout / "best.pt"), cfg.train.snapshots)
    join_checkpoints(best, out / "best.pt", name=cfg.name)
    log.info("joined %d %s into %s", len(best),
             "members and snapshots" if cfg.train.snapshots > 1 else "members", out / "best.pt")
    if evaluate_test:
        result.test_metrics = evaluate_checkpoint(
            out / "best.pt", "test", out_dir=out, splits=splits, progress=progress,
            summary=True, precision=cfg.train.precision)
    return result


def _start_line(i: int, n: int, mcfg: C.Config, again: bool, extra: str = "") -> None:
    log.info("ensemble member %d of %d (train.seed %d): %s%s%s", i + 1, n, mcfg.train.seed,
             mcfg.out_dir, " (resumed)" if again else "", extra)


def _train_members(members: list[C.Config], fit_one: Callable[..., RunResult], resume: bool,
                   progress: bool, splits: Splits | None, jobs: int) -> list[RunResult]:
    """Train every member (sequentially, or ``jobs`` at a time in processes of their own); one
    RunResult per member, in order. Stops after the first interrupted member or group."""
    n = len(members)
    again = [resume and (Path(m.out_dir) / "last.pt").is_file() for m in members]
    runs: list[RunResult | None] = [None] * n
    todo = list(range(n))
    if jobs > 1:  # finished members only reload their checkpoint: no process needed for them
        todo = [i for i in range(n) if not (again[i] and _finished(members[i]))]
        for i in range(n):
            if i not in todo:
                _start_line(i, n, members[i], True, ": finished")
                runs[i] = RunResult(Path(members[i].out_dir))
    if jobs <= 1:
        for i in todo:
            _start_line(i, n, members[i], again[i])
            runs[i] = fit_one(members[i], resume=again[i], progress=progress, splits=splits,
                              evaluate_test=False)
            if runs[i].interrupted:
                break
    else:
        threads = members[0].train.threads or torch.get_num_threads()
        for k in range(0, len(todo), jobs):
            group = todo[k: k + jobs]
            each = max(1, threads // len(group))
            for i in group:
                _start_line(i, n, members[i], again[i], f" — in its own process, {each} "
                            f"thread{'s' if each > 1 else ''}")
            done = _run_processes([(C.replace(members[i], train={"threads": each}), again[i])
                                   for i in group], fit_one)
            for i, r in zip(group, done):
                runs[i] = r
            if any(r.interrupted for r in done):
                break
    return [r if r is not None else RunResult(Path(m.out_dir)) for r, m in zip(runs, members)]


def _best_epoch(best: Path) -> int:
    """The epoch a member's best.pt was written at (its train_state)."""
    return int(load_checkpoint(best).get("train_state", {}).get("best_epoch", -1))


def _finished(mcfg: C.Config) -> bool:
    """Whether the member's last.pt is the end of its run (all epochs, or early-stopped)."""
    try:
        ckpt = load_checkpoint(Path(mcfg.out_dir) / "last.pt")
    except Exception:  # noqa: BLE001 - unreadable: let the member's own resume report it
        return False
    state = TrainState(**{k: v for k, v in ckpt.get("train_state", {}).items()
                          if k in TrainState.__dataclass_fields__})
    return state.batch_in_epoch == 0 and run_done(state, mcfg.train)


def _member_process(fit_one: Callable[..., RunResult], mcfg: C.Config, resume: bool,
                    level: int, conn: Any) -> None:
    """A member trained in a child process; its RunResult (or its error, one line) sent back."""
    logging.basicConfig(level=level, format="showattend: %(message)s")
    try:
        r = fit_one(mcfg, resume=resume, progress=False, splits=None, evaluate_test=False)
        conn.send(("ok", r.epochs, r.train_seconds, r.interrupted,
                   str(r.last) if r.last else None))
    except BaseException as exc:  # noqa: BLE001 - reported by the parent in one line
        lines = str(exc).strip().splitlines()
        conn.send(("error", lines[0] if lines else type(exc).__name__))
    finally:
        conn.close()


def _run_processes(jobs: list[tuple[C.Config, bool]],
                   fit_one: Callable[..., RunResult]) -> list[RunResult]:
    """Train each (config, resume) in a spawned process, all at once; wait for every one.
    SIGINT/SIGTERM received meanwhile are passed on to the children, which save their last.pt
    and stop like any run; an error in one is raised here once all have ended."""
    ctx = mp.get_context("spawn")
    procs, conns = [], []
    for mcfg, again in jobs:
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_member_process, daemon=False,
                        args=(fit_one, mcfg, again, logging.getLogger().getEffectiveLevel(),
                              child))
        procs.append(p)
        conns.append(parent)

    def forward(signum, _frame):
        for p in procs:
            if p.pid is not None and p.is_alive():
                os.kill(p.pid, signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for p in procs:
            p.start()
        replies = []
        for p, conn in zip(procs, conns):
            try:
                replies.append(conn.recv())
            except EOFError:  # died without a word (killed, out of memory)
                replies.append(("error", "its process ended without a result"))
            p.join()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    results, errors = [], []
    for (mcfg, _), reply, p in zip(jobs, replies, procs):
        if reply[0] != "ok":
            errors.append(f"ensemble member {mcfg.out_dir}: {reply[1]}"
                          + (f" (exit code {p.exitcode})" if p.exitcode else ""))
            continue
        _, epochs, seconds, interrupted, last = reply
        results.append(RunResult(Path(mcfg.out_dir), epochs=epochs, train_seconds=seconds,
                                 interrupted=interrupted, last=Path(last) if last else None))
    if errors:
        raise TrainingError("; ".join(errors))
    return results
