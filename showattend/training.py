"""Training loop (torchvision-reference shape): train_one_epoch, evaluate, fit.

Resumable and crash-safe: ``last.pt`` is written atomically at the end of every epoch (and on
SIGINT/SIGTERM, mid-epoch) with model, optimiser, schedule, baseline, RNG state and position in
the epoch, so a resumed run continues exactly where the checkpoint left off. The data order of an
epoch is a pure function of (seed, epoch), which makes resumption bit-identical on CPU.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from showattend import config as C
from showattend import distributed as D
from showattend.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from showattend.data.coco import ImageRecord
from showattend.data.datasets import (CaptionDataset, ImageDataset, ImageSource, Splits,
                                      collate_captions, collate_images, load_splits, load_vocab)
from showattend.data.prepared import load_cache_encoder, make_source, use_features
from showattend.data.images import Preprocessor
from showattend.decoding import decode
from showattend.io import atomic_write_json, atomic_write_text
from showattend.losses import doubly_stochastic, masked_cross_entropy, reinforce_loss, token_nll
from showattend.models.captioner import Captioner
from showattend.progress import progress_bar, write
from showattend.vocab import PAD_ID, Vocab

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot continue (non-finite loss, bad resume, missing GPU…)."""


def resolve_device(name: str) -> torch.device:
    """"auto" → first GPU if present, else CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"device '{name}' was requested but no CUDA GPU is available "
                            f"(use the cpu device instead)")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise TrainingError(f"unknown device '{name}'") from None
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise TrainingError(f"device '{name}' was requested but only "
                            f"{torch.cuda.device_count()} CUDA GPU(s) are visible")
    if dev.type not in ("cpu", "cuda"):
        # mps/xpu/...: torch.device() accepts the name even when this build or machine cannot
        # use it, and the first tensor moved there fails with a traceback deep in the model.
        try:
            torch.empty(0, device=dev)
        except Exception:  # noqa: BLE001 - RuntimeError/AssertionError depending on the backend
            raise TrainingError(f"device '{name}' was requested but is not available here "
                                f"(use the cpu device instead)") from None
    return dev


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA for ``precision = "bf16"``; a no-op context otherwise.

    Wraps forward passes and losses only: backward reuses the dtypes autocast chose, and bf16
    keeps fp32's exponent range, so no gradient scaler is needed. Outside CUDA it does nothing
    (training refuses bf16 there; decoding a bf16-trained model on CPU simply runs in fp32).
    """
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def check_precision(precision: str, device: torch.device) -> None:
    """Training in bf16 needs CUDA: on CPU, autocast would be slower and change the numbers."""
    if precision == "bf16" and device.type != "cuda":
        raise TrainingError(f"train.precision = 'bf16' needs a CUDA device, but this run is on "
                            f"{device.type} (use train.precision=fp32)")


def make_preprocess(cfg: C.Config, model: Captioner) -> Preprocessor:
    """The one preprocessing of a model: size from the config, normalisation from the weights."""
    norm = model.encoder.normalisation
    size = cfg.encoder.image_size
    return Preprocessor(size=(size, size), mean=tuple(norm.mean), std=tuple(norm.std),
                        resize=cfg.encoder.resize)


def lr_at(base_lr: float, decays: int, factor: float, schedule: str = "plateau",
          step: int = 0, total: int = 1, final: float = 0.0) -> float:
    """Learning rate: a pure function of the schedule state, so a resumed run repeats it.

    "plateau": ``base_lr`` after ``decays`` plateau decays by ``factor``; "cosine": half a cosine
    from ``base_lr`` at step 0 to ``base_lr * final`` at step ``total`` (plateau decays ignored).
    """
    if schedule == "cosine":
        frac = min(max(step / max(total, 1), 0.0), 1.0)
        return base_lr * (final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * frac)))
    return base_lr * factor ** decays


@dataclass
class TrainState:
    """Everything beyond weights that a resumed run needs."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps taken
    batch_in_epoch: int = 0  # batches of the current epoch already done (mid-epoch save)
    best: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0  # epochs since the best (early stopping and plateau)
    decays: int = 0  # LR decays so far
    since_decay: int = 0
    baseline: float | None = None  # REINFORCE moving-average baseline
    skipped_steps: int = 0
    bad_images: int = 0
    elapsed: float = 0.0  # training seconds so far

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


class _StopFlag:
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


def _mix_for_batch(cfg: C.HardConfig, b: int, device: torch.device) -> tuple[str, torch.Tensor | None]:
    """The paper's trick: use the expected context with probability mix_prob."""
    if cfg.mix_mode == "batch":
        if float(torch.rand(())) < cfg.mix_prob:
            return "expectation", None
        return "sample", None
    if cfg.mix_mode == "sample":
        return "sample", torch.rand(b) < cfg.mix_prob
    return "sample", None


def train_step(model: Captioner, imgs: torch.Tensor, caps: torch.Tensor, cfg: C.Config,
               state: TrainState, stats: bool = False, features: bool = False,
               dist: D.Dist = D.SINGLE) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one batch (not yet backpropagated) and its logged statistics.

    ``features=True``: ``imgs`` are cached annotations (B, L, D) and the encoder is skipped.
    ``model`` may be wrapped in DistributedDataParallel; under torchrun ``dist`` makes the
    REINFORCE baseline follow the mean reward of the whole global batch, on every rank alike.
    """
    core = D.unwrap(model)
    targets = caps[:, 1:]  # (B, T)
    mask = targets != PAD_ID
    # DDP averages gradients over ranks: each rank's per-token (and per-image) means are weighted
    # by its share of the global batch, so the step is that of one process on the whole batch
    w_tok = D.token_weight(int(mask.sum()), dist)[0]
    if not core.stochastic:  # soft, local, multi-head, differentiable glimpses
        out = model(imgs, caps, feats=imgs if features else None)
        ce = masked_cross_entropy(out, targets)
        ds = doubly_stochastic(out.alphas, mask)
        loss = w_tok * ce + cfg.train.alpha_c * D.token_weight(len(caps), dist)[0] * ds
        return loss, {"loss": _global_mean(loss, dist), "ce": ce.item(), "ds": ds.item()}
    h = cfg.hard
    feats = imgs if features else core.encode(imgs)  # (B, L, D)
    if h.n_samples > 1:
        feats = feats.repeat_interleave(h.n_samples, 0)  # (B·N, L, D)
        caps = caps.repeat_interleave(h.n_samples, 0)
        targets, mask = caps[:, 1:], caps[:, 1:] != PAD_ID
    mode, mix = _mix_for_batch(h, feats.shape[0], feats.device)
    if dist.enabled and h.mix_mode == "batch":  # one decision for the global batch: the ranks
        mode = D.broadcast(mode, dist)  # must run the same collectives below
    if mix is not None:
        mix = mix.to(feats.device)
    out = model(imgs, caps, mode=mode, mix=mix, feats=feats)
    if mode == "expectation":
        ds = doubly_stochastic(out.alphas, mask)
        ce = masked_cross_entropy(out, targets)
        loss = w_tok * ce + cfg.train.alpha_c * D.token_weight(len(caps), dist)[0] * ds
        return loss, {"loss": _global_mean(loss, dist), "ce": float(ce.detach()),
                      "ds": float(ds.detach()), "soft_batch": 1.0}
    sampled = ~mix if mix is not None else torch.ones(feats.shape[0], dtype=torch.bool,
                                                     device=feats.device)
    # The doubly stochastic penalty is a soft-attention regulariser: it applies to the captions
    # that used the expected context only, so with mixing off the attention parameters learn
    # through the score-function term alone (as the paper's estimator prescribes).
    ds = (doubly_stochastic(out.alphas[~sampled], mask[~sampled]) if bool((~sampled).any())
          else out.alphas.new_zeros(()))
    baseline = state.baseline
    if baseline is None:
        # start the moving average at the first rewards, not at 0 — of the sampled captions only,
        # like every later update (expected-context captions are not draws of the estimator)
        with torch.no_grad():
            r0 = -token_nll(out, targets).sum(1)[sampled]  # (S,)
        r_sum, r_cnt = D.all_sum([float(r0.sum()), float(len(r0))], dist)
        # no sampled caption yet: the advantages are all masked to 0 anyway
        baseline = r_sum / r_cnt if r_cnt else None
    if baseline is None:
        baseline = 0.0
    hl = reinforce_loss(out, targets, out.log_probs, out.entropies, baseline, h.lambda_r,
                        h.lambda_e, sampled)
    loss = w_tok * hl.loss + cfg.train.alpha_c * D.token_weight(int((~sampled).sum()), dist)[0] * ds
    r_sum, r_cnt = D.all_sum([float(hl.reward[sampled].sum()), float(sampled.sum())], dist)
    if r_cnt:
        r = r_sum / r_cnt  # mean reward of the sampled captions (of the global batch)
        if math.isfinite(r):  # one non-finite batch (skipped by nan_policy) must not poison b
            state.baseline = h.baseline_decay * baseline + (1 - h.baseline_decay) * r
    rec = {"loss": _global_mean(loss, dist), "ce": float(hl.ce.detach()), "reward": float(hl.reward.mean()),
           "baseline": float(baseline), "adv_std": float(hl.advantage[sampled].std())
           if int(sampled.sum()) > 1 else 0.0, "entropy": float(hl.entropy.detach()), "soft_batch": 0.0}
    if bool((~sampled).any()):  # the penalty exists only for expected-context captions
        rec["ds"] = float(ds.detach())
    if stats:
        rec["sf_grad_var"] = score_function_grad_variance(core, hl, out, targets, h, sampled)
    return loss, rec


def _global_mean(loss: torch.Tensor, dist: D.Dist) -> float:
    """The loss of the whole global batch from the ranks' share-weighted losses."""
    return D.all_sum([float(loss.detach())], dist)[0] / dist.world


def score_function_grad_variance(model: Captioner, hl, out, targets, h: C.HardConfig,
                                 sampled: torch.Tensor, chunks: int = 4) -> float:
    """Variance (trace, per parameter) of the score-function gradient on the attention parameters,
    estimated from ``chunks`` disjoint sub-batches (each an independent estimate)."""
    params = [p for p in model.decoder.attention.parameters() if p.requires_grad]
    mask = targets != PAD_ID
    logp_s = (out.log_probs * mask).sum(1)  # (B,)
    idx = torch.arange(len(logp_s), device=logp_s.device)[sampled]
    if len(idx) < chunks:
        return float("nan")
    grads = []
    for part in idx.chunk(chunks):
        sf = -(h.lambda_r * hl.advantage[part] * logp_s[part]).sum() / mask[part].sum().clamp_min(1)
        g = torch.autograd.grad(sf, params, retain_graph=True, allow_unused=True)
        grads.append(torch.cat([x.flatten() if x is not None else torch.zeros_like(p).flatten()
                                for x, p in zip(g, params)]))
    G = torch.stack(grads)  # (chunks, P)
    return float(G.var(0).sum())


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


def train_one_epoch(model: Captioner, optimizer: torch.optim.Optimizer, dataset: CaptionDataset,
                    cfg: C.Config, state: TrainState, device: torch.device, log_fn, stop: _StopFlag,
                    save_fn, progress: bool = True, dist: D.Dist = D.SINGLE) -> bool:
    """One pass over the training captions; returns False if interrupted by a signal.

    Under torchrun every rank takes its share of each global batch of ``train.batch_size``
    captions (the same optimiser steps as one process), and all ranks agree on skipping a batch
    and on stopping, so none is left waiting in a collective.
    """
    model.train()
    core = D.unwrap(model)
    order = _epoch_order(len(dataset), cfg.train.seed, state.epoch)
    bs = cfg.train.batch_size
    batches = [order[i: i + bs] for i in range(0, len(order), bs)]
    if dist.enabled:  # a global batch smaller than the job would leave a rank without work
        batches = [D.shard(b, dist) for b in batches if len(b) >= dist.world]
    start = state.batch_in_epoch
    bar = progress_bar(total=len(batches), initial=start, desc=f"epoch {state.epoch + 1}",
                       unit="batch", disable=not progress, leave=False)
    # The batch list is fixed up front, so worker processes change speed, never the order.
    loader = DataLoader(dataset, batch_sampler=batches[start:], collate_fn=collate_captions,
                        num_workers=cfg.data.num_workers, worker_init_fn=_ignore_sigint,
                        pin_memory=device.type == "cuda",
                        # Its own generator: iterating a DataLoader draws a worker base seed, and
                        # from the global RNG that draw would shift the dropout/sampling stream of
                        # a run resumed mid-epoch (the saved RNG state is after the first draw).
                        generator=torch.Generator().manual_seed(
                            cfg.train.seed * 100_003 + state.epoch))
    t0 = time.time()
    for bi, (imgs, caps, _, n_bad) in enumerate(loader, start):
        state.bad_images += n_bad
        if D.any_flag(imgs is None, dist):  # every image of the batch (of some rank) unreadable
            state.batch_in_epoch = bi + 1
            continue
        imgs, caps = imgs.to(device, non_blocking=True), caps.to(device, non_blocking=True)
        # stats are computed on the step that will be logged (after the increment below)
        want_stats = (core.stochastic
                      and (state.step + 1) % cfg.train.log_every == 0)
        with autocast(cfg.train.precision, device):
            loss, rec = train_step(model, imgs, caps, cfg, state, stats=want_stats,
                                   features=getattr(dataset.source, "features", False), dist=dist)
        loss_value = float(loss.detach())
        if D.any_flag(not math.isfinite(loss_value), dist):
            _non_finite(cfg, state, f"loss ({loss_value})")
            optimizer.zero_grad(set_to_none=True)
            state.batch_in_epoch = bi + 1
            continue
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # grad_clip = 0 means no clipping (a max norm of 0 would zero every gradient)
        gnorm = torch.nn.utils.clip_grad_norm_(
            [p for g in optimizer.param_groups for p in g["params"]],
            cfg.train.grad_clip or math.inf)
        if not math.isfinite(float(gnorm)):
            # A finite loss can still have inf/NaN gradients; one step with them would write
            # NaN into every weight (and into the next checkpoint).
            _non_finite(cfg, state, f"gradient norm ({float(gnorm)})")
            optimizer.zero_grad(set_to_none=True)
            state.batch_in_epoch = bi + 1
            continue
        if cfg.train.lr_schedule == "cosine":  # per step: the epoch's batches are known here
            _set_lr(optimizer, state.decays, cfg.train, state.step, cfg.train.epochs * len(batches))
        optimizer.step()
        state.step += 1
        state.batch_in_epoch = bi + 1
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.3f}")
        if state.step % cfg.train.log_every == 0:
            rec.update(kind="train", epoch=state.epoch, step=state.step, grad_norm=float(gnorm),
                       lr=optimizer.param_groups[0]["lr"])
            log_fn(rec)
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


@torch.no_grad()
def decode_records(model: Captioner, source: ImageSource, vocab: Vocab, device: torch.device,
                   beam: int = 1, max_len: int = 20, length_norm: float = 0.0, batch_size: int = 100,
                   mode: str | None = None, progress: bool = True,
                   precision: str = "fp32", no_repeat_ngram: int = 0) -> list[dict[str, Any]]:
    """Caption every good image of ``source``: one dict per image (words, attention, β, …).
    ``precision`` "bf16" decodes under bf16 autocast on CUDA."""
    model.eval()
    ds = ImageDataset(source)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate_images)
    gh, gw = model.grid
    results = []
    for imgs, idxs, _ in progress_bar(loader, desc="decoding", unit="batch", disable=not progress,
                                      leave=False):
        if imgs is None:
            continue
        imgs = imgs.to(device)
        with autocast(precision, device):
            # a prepared feature cache holds the annotations already
            feats = imgs if getattr(source, "features", False) else model.encode(imgs)  # (B, L, D)
            dec = decode(model, feats, beam=beam, max_len=max_len, length_norm=length_norm,
                         mode=mode, no_repeat_ngram=no_repeat_ngram)
        for j, i in enumerate(idxs):
            n = int(dec.lengths[j])
            words = vocab.decode(dec.tokens[j, :n].tolist())
            results.append({
                "index": i,
                "image_id": source.records[i].image_id,
                "caption": " ".join(words),
                "words": words,
                "score": float(dec.scores[j]),
                # .float(): numpy has no bfloat16 (decoding under bf16 autocast)
                "alphas": dec.alphas[j, :n].reshape(n, gh, gw).float().cpu().numpy(),  # (n,h,w)
                "betas": dec.betas[j, :n].float().cpu().numpy(),
                "locations": dec.locations[j, :n].cpu().numpy(),
            })
    return results


def score_results(results: list[dict[str, Any]], records: list[ImageRecord],
                  objects: dict[int, list[dict]] | None, meteor: bool = False) -> dict[str, float]:
    """Caption metrics, grounding (when objects are known) and degeneracy diagnostics."""
    from showattend import metrics as M

    refs = {r.image_id: list(r.captions) for r in records if r.captions}
    hyps = {res["image_id"]: res["caption"] for res in results if res["image_id"] in refs}
    out: dict[str, float] = {}
    if hyps:
        out.update(M.caption_metrics(hyps, {k: refs[k] for k in hyps}, meteor=meteor))
    if objects and results:
        from PIL import Image

        with Image.open(records[results[0]["index"]].path) as im:
            size = (im.height, im.width)
        keep = [r for r in results if r["image_id"] in objects]
        out.update(M.grounding([r["words"] for r in keep], [r["alphas"] for r in keep],
                               [objects[r["image_id"]] for r in keep], size))
    out.update(M.diagnostics([r["caption"] for r in results], [r["alphas"] for r in results]))
    out["images"] = float(len(results))
    return out


def build_optimizer(model: Captioner, cfg: C.TrainConfig) -> torch.optim.Optimizer:
    """Adam over the decoder (and the encoder's trainable blocks, with their own learning rate).

    The fused implementation where the parameters' device has one (CPU and CUDA): on the CPU
    the default per-parameter loop took 0.20 s per step for a COCO-sized decoder (25 M
    parameters), the fused step 0.03 s (bench/README.md).
    """
    enc = [p for p in model.encoder.parameters() if p.requires_grad]
    # everything outside the encoder: the decoder and the self-attention layers (which train
    # even when the CNN is frozen); same order as before for the plain model (resumable)
    in_enc = {id(p) for p in model.encoder.parameters()}
    dec = [p for p in model.parameters() if p.requires_grad and id(p) not in in_enc]
    groups = [{"params": dec, "lr": cfg.lr, "base_lr": cfg.lr}]
    if enc:
        elr = cfg.encoder_lr or cfg.lr
        groups.append({"params": enc, "lr": elr, "base_lr": elr})
    devices = {p.device.type for g in groups for p in g["params"]}
    fused = True if devices and devices <= {"cpu", "cuda"} else None
    return torch.optim.Adam(groups, weight_decay=cfg.weight_decay, fused=fused)


def _set_lr(optimizer: torch.optim.Optimizer, decays: int, cfg: C.TrainConfig, step: int = 0,
            total: int = 1) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr_at(g["base_lr"], decays, cfg.lr_decay, cfg.lr_schedule, step, total,
                        cfg.lr_final)


@dataclass
class RunResult:
    out_dir: Path
    test_metrics: dict[str, float] = field(default_factory=dict)
    epochs: int = 0
    interrupted: bool = False
    train_seconds: float = 0.0


def _jsonl_append(path: Path, rec: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(rec) + "\n")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    return out


def fit(cfg: C.Config, resume: bool = False, progress: bool = True,
        splits: Splits | None = None, evaluate_test: bool = True) -> RunResult:
    """Train per ``cfg`` into cfg.out_dir; evaluate the best checkpoint on the test split.

    The process-wide torch settings a run changes (threads, deterministic algorithms, flushing
    denormals) are restored on return, so calling ``fit`` from a notebook, an API user's program
    or a test session leaves the caller's numerics as they were.
    """
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    flush_denormal = float(torch.tensor([1e-40]) * 1.0) == 0.0  # torch has no getter for this
    try:
        return _fit(cfg, resume, progress, splits, evaluate_test)
    finally:
        D.teardown(D.from_env())
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        torch.set_flush_denormal(flush_denormal)


def _absolute_data_paths(cfg: C.Config) -> C.Config:
    """Data paths made absolute, so the saved config finds the data from any working directory."""
    d = cfg.data
    fields = {k: str(Path(getattr(d, k)).resolve()) for k in
              ("root", "train_annotations", "val_annotations", "test_annotations", "split_file",
               "objects", "flickr_captions", "flickr_splits", "prepared") if getattr(d, k)}
    return C.replace(cfg, data=fields)


def _fit(cfg: C.Config, resume: bool, progress: bool, splits: Splits | None,
         evaluate_test: bool) -> RunResult:
    out = Path(cfg.out_dir)
    dist = D.from_env()
    main = dist.main  # only rank 0 writes files and prints
    progress = progress and main
    if main:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".*.tmp"):  # temp files of atomic writes cut short by a crash
            stale.unlink(missing_ok=True)
    ckpt = None
    if resume:
        if not (out / "last.pt").is_file():
            raise TrainingError(f"--resume: no checkpoint {out / 'last.pt'}")
        ckpt = load_checkpoint(out / "last.pt")
        saved = C.from_dict(C.Config, ckpt["config"])
        if C.replace(saved, train={"epochs": cfg.train.epochs}) != cfg:
            log.warning("resuming with the configuration saved in the checkpoint "
                        "(only train.epochs may change on resume)")
        cfg = C.replace(saved, train={"epochs": cfg.train.epochs})
    else:
        if main and (out / "last.pt").is_file():
            log.warning("%s already holds a run: starting a new one over it (use --resume to "
                        "continue the old one)", out)
        cfg = _absolute_data_paths(cfg)
    device = resolve_device(cfg.train.device)
    dist = D.setup(device)
    device = D.device_for(dist, device)
    check_precision(cfg.train.precision, device)
    if device.type == "cpu":
        # Denormal floats appear in LSTM/attention gradients late in training and slow CPU
        # arithmetic by an order of magnitude; flushing them to zero costs no accuracy here.
        torch.set_flush_denormal(True)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.train.seed)
    if dist.enabled and not main:  # rank 0 first: it may generate or check the data on disk
        D.barrier(dist)
    splits = splits or load_splits(cfg.data, progress=progress)
    if dist.enabled and main:
        D.barrier(dist)
    vocab = load_vocab(cfg.data, splits)  # a prepared folder's own vocabulary
    if ckpt is not None:
        saved_vocab = Vocab.from_dict(ckpt["vocab"])
        if saved_vocab != vocab:
            raise TrainingError(f"vocabulary mismatch: the data now gives {len(vocab)} words, the "
                                f"checkpoint has {len(saved_vocab)}; the training data changed")
        vocab = saved_vocab
    model = Captioner.from_config(cfg, len(vocab)).to(device)
    if model.stochastic and cfg.hard.warm_start and ckpt is None:
        warm = load_checkpoint(cfg.hard.warm_start)
        if Vocab.from_dict(warm["vocab"]) != vocab:
            raise TrainingError(f"hard.warm_start {cfg.hard.warm_start}: vocabulary differs from "
                                f"this data's")
        try:
            model.load_state_dict(warm["model"])
        except RuntimeError as exc:
            raise TrainingError(f"hard.warm_start: incompatible model "
                                f"({str(exc).splitlines()[0]})") from None
    if splits.prepared is not None and ckpt is None and use_features(cfg, model, splits.prepared):
        # train on the cache's features with the encoder that computed them, so the checkpoint
        # captions raw images with the same annotations the decoder learnt from
        load_cache_encoder(model, splits.prepared)
    preprocess = make_preprocess(cfg, model)
    optimizer = build_optimizer(model, cfg.train)
    state = TrainState()
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            state = TrainState(**ckpt["train_state"])
            ranks = ckpt["rng"].get("ranks")
            if dist.enabled and (not ranks or len(ranks) != dist.world):
                raise TrainingError(f"cannot resume {ckpt['path']} with {dist.world} processes: "
                                    f"it was saved by {len(ranks) if ranks else 1}")
            torch.set_rng_state(ranks[dist.rank] if dist.enabled else ckpt["rng"]["torch"])
            if device.type == "cuda" and "cuda" in ckpt["rng"]:
                cuda = ckpt["rng"].get("cuda_ranks") if dist.enabled else None
                torch.cuda.set_rng_state(cuda[dist.rank] if cuda else ckpt["rng"]["cuda"], device)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            # e.g. an exported/edited checkpoint without optimizer state, or mismatched shapes
            what = (f"missing {exc}" if isinstance(exc, KeyError)
                    else str(exc).strip().splitlines()[0])
            raise CheckpointError(f"cannot resume from {ckpt['path']}: {what}") from None
    if dist.enabled:
        # each rank draws its own dropout masks and attention samples (rank 0 continues the
        # single-process stream); the parameters are rank 0's, broadcast by DDP
        if ckpt is None and not main:
            torch.manual_seed(cfg.train.seed + 1000 * dist.rank)
    train_model = D.wrap(model, dist, device, find_unused=model.stochastic)
    C_dict = C.to_dict(cfg)
    log_path = out / "metrics.jsonl"
    if main:
        atomic_write_text(out / "config.json", json.dumps(C_dict, indent=2) + "\n")
        atomic_write_text(out / "config.toml", C.to_toml(cfg))  # `train --config` this to rerun
        if ckpt is not None:  # drop records of the run after its last checkpoint (a crash)
            keep = [r for r in _read_jsonl(log_path) if r.get("step", 0) <= state.step
                    and r.get("epoch", 0) <= state.epoch]
            atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in keep))
        elif log_path.exists():
            log_path.unlink()

    def log_fn(rec: dict[str, Any]) -> None:
        if main:
            _jsonl_append(log_path, rec)

    def save_fn(name: str) -> None:
        rng = {"torch": torch.get_rng_state()}
        if dist.enabled:  # every rank's stream, so a resumed job continues each one exactly
            rng["ranks"] = D.gather([rng["torch"]], dist)
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
            if dist.enabled:
                rng["cuda_ranks"] = D.gather([rng["cuda"]], dist)
        if not main:
            return
        save_checkpoint(out / name, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "config": C_dict, "vocab": vocab.to_dict(), "preprocess": preprocess.to_dict(),
            "train_state": state.to_dict(), "rng": rng,
        })

    cache = cfg.data.cache_in_memory
    on_bad = cfg.data.on_bad_image
    train_src = make_source(cfg, splits, splits.train, preprocess, model, cache, "train", progress,
                            on_bad)
    val_recs = splits.val[: cfg.train.val_images] if cfg.train.val_images else splits.val
    # under torchrun each rank decodes every world-th validation image; rank 0 scores them all
    val_src = make_source(cfg, splits, val_recs[dist.rank:: dist.world], preprocess, model, cache,
                          "val", progress, on_bad)
    for name, src in (("train", train_src), ("val", val_src)):
        if src.bad:
            first = next(iter(src.bad.values()))
            log.warning("skipped %d unreadable %s images (first: %s)", len(src.bad), name, first)
    train_ds = CaptionDataset(train_src, vocab, cfg.data.max_len)
    for reason, n in train_ds.skipped.items():
        log.warning("skipped %d training captions with %s (first: %s)", n, reason,
                    train_ds.first_skipped[reason])
    if len(train_ds) == 0:
        raise TrainingError("no usable training captions (all images unreadable, or captions "
                            "empty or without a word in the vocabulary)")
    sizes = D.gather([len(train_ds)], dist)
    if len(set(sizes)) > 1:  # an image unreadable on one rank only: the shards would not line up
        raise TrainingError(f"the processes see different training sets ({sizes} captions); "
                            f"check that every process reads the same files")
    result = RunResult(out)
    with _StopFlag() as stop:
        # the early-stop test is repeated here so that resuming a run that stopped early (and
        # was then killed during its test evaluation) does not train on
        while state.epoch < cfg.train.epochs and not (
                cfg.train.early_stop and state.bad_epochs >= cfg.train.early_stop):
            _set_lr(optimizer, state.decays, cfg.train)
            finished = train_one_epoch(train_model, optimizer, train_ds, cfg, state, device, log_fn,
                                       stop, save_fn, progress, dist)
            if not finished:
                result.interrupted = True
                log.warning("interrupted by signal %s: saved %s", stop.signum, out / "last.pt")
                break
            val_res = decode_records(model, val_src, vocab, device, beam=cfg.train.val_beam,
                                     max_len=cfg.eval.max_len, batch_size=cfg.eval.batch_size,
                                     progress=progress, precision=cfg.train.precision,
                                     length_norm=cfg.eval.length_norm,
                                     no_repeat_ngram=cfg.eval.no_repeat_ngram)
            for r in val_res:  # shard index → index into val_recs
                r["index"] = r["index"] * dist.world + dist.rank
            val_res = D.gather(val_res, dist)
            val = score_results(val_res, val_recs, splits.objects.get("val"),
                                meteor=False) if main else None
            val = D.broadcast(val, dist)
            state.epoch += 1
            state.batch_in_epoch = 0
            metric = val.get(cfg.train.val_metric, 0.0)
            improved = metric > state.best
            if improved:
                state.best, state.best_epoch, state.bad_epochs, state.since_decay = metric, state.epoch, 0, 0
            else:
                state.bad_epochs += 1
                state.since_decay += 1
                if state.since_decay >= cfg.train.lr_patience:
                    state.decays += 1
                    state.since_decay = 0
            log_fn({"kind": "val", "epoch": state.epoch, "step": state.step,
                    "lr": optimizer.param_groups[0]["lr"], "elapsed": round(state.elapsed, 2),
                    **{f"val_{k}": v for k, v in val.items()}})
            # best.pt first: a crash between the two saves then re-runs this epoch on resume and
            # rewrites both, whereas the other order would leave a stale best.pt for good.
            if improved:
                save_fn("best.pt")
            save_fn("last.pt")
            if main:
                _plot(log_path, out)
            if progress:
                write(f"epoch {state.epoch}: val {cfg.train.val_metric} {metric:.4f} "
                           f"(best {state.best:.4f} @ {state.best_epoch}), "
                           f"grounding {val.get('grounding', float('nan')):.3f}, "
                           f"{state.elapsed:.0f}s")
            if cfg.train.early_stop and state.bad_epochs >= cfg.train.early_stop:
                log.info("early stop: no improvement in %d epochs", state.bad_epochs)
                break
            if D.any_flag(stop.signum is not None, dist):
                result.interrupted = True
                break
    result.epochs = state.epoch
    result.train_seconds = state.elapsed
    if state.bad_images:
        log.warning("skipped %d unreadable images during training", state.bad_images)
    if evaluate_test and main and not result.interrupted and (out / "best.pt").is_file():
        result.test_metrics = evaluate_checkpoint(out / "best.pt", "test", out_dir=out,
                                                  splits=splits, progress=progress, summary=True)
    return result


_CURVE_KEYS = ("loss", "ce", "ds", "grad_norm", "lr", "reward", "baseline", "adv_std", "entropy",
               "sf_grad_var", "val_BLEU-4", "val_CIDEr", "val_grounding", "val_grounding_strict",
               "val_distinct_captions", "val_attention_entropy", "val_attention_change")


def _plot(log_path: Path, out: Path) -> None:
    from showattend.visualize import plot_curves

    # training records against step, validation records against epoch
    recs = [{k: v for k, v in r.items() if k != "epoch"} if r.get("kind") == "train" else r
            for r in _read_jsonl(log_path)]
    keys = [k for k in _CURVE_KEYS if any(k in r for r in recs)]
    if recs and keys:
        try:
            plot_curves(recs, out / "curves.png", keys)
        except Exception as exc:  # a plot must never kill a training run
            log.warning("could not draw curves: %s", exc)


def load_model(path: str | Path, device: torch.device | str = "auto", int8: bool = False
               ) -> tuple[Captioner, Vocab, Preprocessor, C.Config, dict[str, Any]]:
    """Model, vocabulary, preprocessing and config from one checkpoint (they travel together).
    ``device`` is a torch.device or a name for :func:`resolve_device` ("auto", "cpu", ...);
    ``int8``: dynamic int8 decoder for CPU decoding (:mod:`showattend.quantize`)."""
    if isinstance(device, str):
        device = resolve_device(device)
    ckpt = load_checkpoint(path)
    try:
        cfg = C.from_dict(C.Config, ckpt["config"])
        vocab = Vocab.from_dict(ckpt["vocab"])
        preprocess = Preprocessor.from_dict(ckpt["preprocess"])
        # weights come from the checkpoint: never try to download the backbone's
        cfg_nw = C.replace(cfg, encoder={"weights": "none"})
        model = Captioner.from_config(cfg_nw, len(vocab))
        model.load_state_dict(ckpt["model"])
    except (C.ConfigError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {ckpt['path']} does not match this showattend: "
                              f"{str(exc).splitlines()[0]}") from None
    model.to(device).eval()
    if int8:
        from showattend.quantize import quantize_decoder

        quantize_decoder(model)
    return model, vocab, preprocess, cfg, ckpt


def evaluate_checkpoint(path: str | Path, split: str = "test", beam: int | None = None,
                        out_dir: str | Path | None = None, splits: Splits | None = None,
                        device: str | None = None, meteor: bool | None = None,
                        progress: bool = True, mode: str | None = None,
                        summary: bool = False, length_norm: float | None = None,
                        no_repeat_ngram: int | None = None, int8: bool = False
                        ) -> dict[str, float]:
    """Decode ``split`` with a checkpoint; write metrics_<split>_beam<N>.json and COCO-format
    results_<split>_beam<N>.json next to the checkpoint (or in ``out_dir``); return the metrics.
    ``summary`` also writes metrics.json (the run's headline figures, written by training)."""
    from showattend.metrics import write_coco_results

    dev = resolve_device(device or "auto")
    model, vocab, preprocess, cfg, ckpt = load_model(path, dev, int8=int8)
    if mode:
        model.test_mode = mode
    splits = splits or load_splits(cfg.data, progress=progress)
    records = {"train": splits.train, "val": splits.val, "test": splits.test}[split]
    if load_vocab(cfg.data, splits) != vocab:
        log.warning("the training data's vocabulary differs from the checkpoint's: evaluating "
                    "with the checkpoint's")
    src = make_source(cfg, splits, records, preprocess, model, False, split, progress, "skip")
    beam = beam or cfg.eval.beam
    t0 = time.time()
    if length_norm is not None or no_repeat_ngram is not None:  # decoding choices of this call
        ev = {k: v for k, v in (("length_norm", length_norm), ("no_repeat_ngram", no_repeat_ngram))
              if v is not None}
        cfg = C.replace(cfg, eval=ev)
        C.validate(cfg)
    results = decode_records(model, src, vocab, dev, beam=beam, max_len=cfg.eval.max_len,
                             length_norm=cfg.eval.length_norm, batch_size=cfg.eval.batch_size,
                             progress=progress, precision=cfg.train.precision,
                             no_repeat_ngram=cfg.eval.no_repeat_ngram)
    dt = time.time() - t0
    metrics = score_results(results, records, splits.objects.get(split),
                            meteor=cfg.eval.meteor if meteor is None else meteor)
    metrics.update(beam=float(beam), length_norm=float(cfg.eval.length_norm), int8=float(int8),
                   no_repeat_ngram=float(cfg.eval.no_repeat_ngram),
                   decode_images_per_s=len(results) / max(dt, 1e-9),
                   skipped_images=float(len(src.bad)))
    out = Path(out_dir) if out_dir else Path(ckpt["path"]).parent
    tag = f"{split}_beam{beam}" + (f"_{mode}" if mode else "")
    write_coco_results(out / f"results_{tag}.json", {r["image_id"]: r["caption"] for r in results})
    atomic_write_json(out / f"metrics_{tag}.json", metrics)
    if summary:
        atomic_write_json(out / "metrics.json", metrics)
    log.info("wrote %s and %s", out / f"metrics_{tag}.json", out / f"results_{tag}.json")
    return metrics


__all__ = ["fit", "train_one_epoch", "evaluate_checkpoint", "decode_records", "score_results",
           "load_model", "resolve_device", "autocast", "TrainingError"]
