"""The epoch loop: batches in a fixed order, one objective step each, stop on a signal.

Under torchrun every rank takes its share of each global batch of ``train.batch_size``
captions (the same optimiser steps as one process), and all ranks agree on skipping a batch
and on stopping, so none is left waiting in a collective.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader

from showattend import config as C
from showattend import distributed as D
from showattend import runtime
from showattend.data.datasets import CaptionDataset, collate_captions
from showattend.progress import progress_bar
from showattend.runtime import TrainingError
from showattend.train.objectives import Objective, train_step
from showattend.train.schedule import set_lr
from showattend.train.state import TrainState, epoch_order

__all__ = ["StopFlag", "train_one_epoch", "optimizer_step"]

log = logging.getLogger(__name__)


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint and exits cleanly."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handler)
            except ValueError:  # not in the main thread
                pass
        return self

    def _handler(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def _ignore_sigint(_worker_id: int) -> None:
    # Ctrl-C reaches the whole process group; the main process saves a checkpoint and stops the
    # workers itself, so a worker dying on SIGINT first would only turn that into a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _non_finite(cfg: C.Config, state: TrainState, what: str) -> None:
    """Apply train.nan_policy to a non-finite loss or gradient: raise ("stop") or count ("skip")."""
    if cfg.train.nan_policy == "stop":
        raise TrainingError(
            f"non-finite {what} at epoch {state.epoch + 1}, step {state.step}; stopped without "
            f"saving — the last good checkpoint is intact (try a lower train.lr or "
            f"train.nan_policy=skip)")
    state.skipped_steps += 1
    if state.skipped_steps <= 5 or state.skipped_steps % 100 == 0:  # report, but do not flood
        log.warning("skipped a batch after step %d of epoch %d: non-finite %s (%d skipped so "
                    "far)", state.step, state.epoch + 1, what, state.skipped_steps)


def _epoch_batches(dataset: CaptionDataset, cfg: C.Config, state: TrainState, dist: D.Dist,
                   per_image: bool = False) -> list[list[int]]:
    """The epoch's batches of dataset indices; ``per_image``: one item (the image's first
    caption) per training image, in an order that is again a pure function of (seed, epoch)."""
    items = range(len(dataset))
    if per_image:
        first: dict[int, int] = {}
        for idx, (img, _) in enumerate(dataset.items):
            first.setdefault(img, idx)
        items = list(first.values())
    order = [items[j] for j in epoch_order(len(items), cfg.train.seed, state.epoch)]
    bs = cfg.train.batch_size
    batches = [order[i: i + bs] for i in range(0, len(order), bs)]
    if dist.enabled:  # a global batch smaller than the job would leave a rank without work
        batches = [D.shard(b, dist) for b in batches if len(b) >= dist.world]
    return batches


def capped_workers(n: int) -> int:
    """data.num_workers, at most the CPU cores this process may use: more only competes with the
    training threads (and torch warns about it at every epoch)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return min(n, cores)


def _loader(dataset: CaptionDataset, batches: list[list[int]], cfg: C.Config, state: TrainState,
            device: torch.device) -> DataLoader:
    # The batch list is fixed up front, so worker processes change speed, never the order.
    return DataLoader(dataset, batch_sampler=batches[state.batch_in_epoch:],
                      collate_fn=collate_captions, num_workers=capped_workers(cfg.data.num_workers),
                      worker_init_fn=_ignore_sigint, pin_memory=device.type == "cuda",
                      # Its own generator: iterating a DataLoader draws a worker base seed, and
                      # from the global RNG that draw would shift the dropout/sampling stream of
                      # a run resumed mid-epoch (the saved RNG state is after the first draw).
                      generator=torch.Generator().manual_seed(
                          cfg.train.seed * 100_003 + state.epoch))


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, cfg: C.Config,
                   state: TrainState, dist: D.Dist, total_steps: int) -> float | None:
    """Backpropagate ``loss`` and step; the gradient norm, or None when the batch was skipped
    (non-finite loss or gradient under ``nan_policy = "skip"``)."""
    loss_value = float(loss.detach())
    if D.any_flag(not math.isfinite(loss_value), dist):
        _non_finite(cfg, state, f"loss ({loss_value})")
        optimizer.zero_grad(set_to_none=True)
        return None
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    # grad_clip = 0 means no clipping (a max norm of 0 would zero every gradient)
    gnorm = torch.nn.utils.clip_grad_norm_(
        [p for g in optimizer.param_groups for p in g["params"]], cfg.train.grad_clip or math.inf)
    if not math.isfinite(float(gnorm)):
        # A finite loss can still have inf/NaN gradients; one step with them would write
        # NaN into every weight (and into the next checkpoint).
        _non_finite(cfg, state, f"gradient norm ({float(gnorm)})")
        optimizer.zero_grad(set_to_none=True)
        return None
    if cfg.train.lr_schedule == "cosine":  # per step: the epoch's batches are known here
        set_lr(optimizer, state.decays, cfg.train, state.step, total_steps)
    optimizer.step()
    state.step += 1
    return float(gnorm)


def train_one_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    dataset: CaptionDataset, cfg: C.Config, state: TrainState,
                    device: torch.device, log_fn: Callable[[dict], None], stop: StopFlag,
                    save_fn: Callable[[str], None], progress: bool = True,
                    dist: D.Dist = D.SINGLE, objective: Objective | None = None) -> bool:
    """One pass over the training captions; returns False if interrupted by a signal.
    ``objective``: the run's (bound to its data); by default the one the model calls for."""
    model.train()
    core = D.unwrap(model)
    batches = _epoch_batches(dataset, cfg, state, dist,
                             per_image=getattr(objective, "per_image", False))
    bar = progress_bar(total=len(batches), initial=state.batch_in_epoch,
                       desc=f"epoch {state.epoch + 1}", unit="batch", disable=not progress,
                       leave=False)
    features = getattr(dataset.source, "features", False)
    t0 = time.time()
    for bi, (imgs, caps, image_ids, n_bad) in enumerate(_loader(dataset, batches, cfg, state, device),
                                                state.batch_in_epoch):
        state.bad_images += n_bad
        if D.any_flag(imgs is None, dist):  # every image of the batch (of some rank) unreadable
            state.batch_in_epoch = bi + 1
            continue
        imgs, caps = imgs.to(device, non_blocking=True), caps.to(device, non_blocking=True)
        # stats are computed on the step that will be logged (after the increment below)
        want_stats = core.stochastic and (state.step + 1) % cfg.train.log_every == 0
        with runtime.autocast(cfg.train.precision, device):
            loss, rec = train_step(model, imgs, caps, cfg, state, stats=want_stats,
                                   features=features, dist=dist, image_ids=image_ids,
                                   objective=objective)
        gnorm = optimizer_step(loss, optimizer, cfg, state, dist, cfg.train.epochs * len(batches))
        state.batch_in_epoch = bi + 1
        if gnorm is None:
            continue
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.3f}")
        if state.step % cfg.train.log_every == 0:
            log_fn({**rec, "kind": "train", "epoch": state.epoch, "step": state.step,
                    "grad_norm": gnorm, "lr": optimizer.param_groups[0]["lr"]})
        if D.any_flag(stop.signum is not None, dist):
            if stop.signum is None:  # another rank was signalled: stop at the same step
                stop.signum = signal.SIGTERM
            state.elapsed += time.time() - t0
            save_fn("last.pt")
            bar.close()
            return False
    state.elapsed += time.time() - t0
    bar.close()
    return True
