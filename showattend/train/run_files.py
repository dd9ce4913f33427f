"""What a run writes into its folder: config, the metrics log, checkpoints and curves.

Only rank 0 writes; every rank takes part in :meth:`RunFiles.save` because the random streams
of all ranks go into the checkpoint. Checkpoints are state dicts + config + vocabulary +
preprocessing + train state + RNG, written atomically.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from showattend import config as C
from showattend import distributed as D
from showattend.checkpoint import save_checkpoint
from showattend.data.images import Preprocessor
from showattend.io import atomic_write_text
from showattend.train.state import TrainState
from showattend.visualize import plot_curves
from showattend.vocab import Vocab

__all__ = ["RunFiles", "read_jsonl", "plot_run", "BASE_CURVE_KEYS"]

log = logging.getLogger(__name__)

#: what ``curves.png`` draws for every run, besides the objective's own keys
BASE_CURVE_KEYS = ("loss", "ce", "ds", "grad_norm", "lr")
VAL_CURVE_KEYS = ("val_BLEU-4", "val_CIDEr", "val_grounding", "val_grounding_strict",
                  "val_distinct_captions", "val_attention_entropy", "val_attention_change")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines log; a line cut by a crash is dropped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    return out


def plot_run(log_path: Path, out: Path, keys: tuple[str, ...]) -> None:
    """curves.png of the ``keys`` present in the log: training records against step,
    validation records against epoch. A plot never kills a run."""
    recs = [{k: v for k, v in r.items() if k != "epoch"} if r.get("kind") == "train" else r
            for r in read_jsonl(log_path)]
    keys = tuple(k for k in keys if any(k in r for r in recs))
    if recs and keys:
        try:
            plot_curves(recs, out / "curves.png", keys)
        except Exception as exc:  # a plot must never kill a training run
            log.warning("could not draw curves: %s", exc)


class RunFiles:
    """The run folder of one training run (``cfg.out_dir``)."""

    def __init__(self, out: Path, dist: D.Dist, curve_keys: tuple[str, ...] = ()):
        self.out = out
        self.dist = dist
        self.main = dist.main
        self.log_path = out / "metrics.jsonl"
        keys = BASE_CURVE_KEYS + tuple(k for k in curve_keys if k not in BASE_CURVE_KEYS)
        self.curve_keys = keys + VAL_CURVE_KEYS

    @staticmethod
    def clean(out: Path) -> None:
        """Create the folder; drop temp files of atomic writes cut short by a crash."""
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".*.tmp"):
            stale.unlink(missing_ok=True)

    def start(self, cfg_dict: dict[str, Any], cfg: C.Config, resumed: TrainState | None) -> None:
        """Write config.json/config.toml; on resume keep the log up to the checkpoint's step
        (records after it belong to the part of the run a crash threw away)."""
        if not self.main:
            return
        atomic_write_text(self.out / "config.json", json.dumps(cfg_dict, indent=2) + "\n")
        atomic_write_text(self.out / "config.toml", C.to_toml(cfg))  # `train --config` reruns it
        if resumed is not None:
            keep = [r for r in read_jsonl(self.log_path) if r.get("step", 0) <= resumed.step
                    and r.get("epoch", 0) <= resumed.epoch]
            atomic_write_text(self.log_path, "".join(json.dumps(r) + "\n" for r in keep))
        elif self.log_path.exists():
            self.log_path.unlink()

    def log(self, rec: dict[str, Any]) -> None:
        """Append one record to metrics.jsonl (rank 0)."""
        if self.main:
            with open(self.log_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(rec) + "\n")

    def save(self, name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             cfg_dict: dict[str, Any], vocab: Vocab, preprocess: Preprocessor,
             state: TrainState, device: torch.device, full: bool = True) -> None:
        """Write checkpoint ``name`` (collective under torchrun: every rank's RNG goes in).
        ``full=False``: the model alone (no optimiser, no RNG): an epoch snapshot, which
        decodes and joins ensembles but does not resume."""
        if not full:
            if self.main:
                save_checkpoint(self.out / name, {
                    "model": model.state_dict(), "config": cfg_dict, "vocab": vocab.to_dict(),
                    "preprocess": preprocess.to_dict(), "train_state": state.to_dict()})
            return
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if self.dist.enabled:  # every rank's stream, so a resumed job continues each one exactly
            rng["ranks"] = D.gather([rng["torch"]], self.dist)
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
            if self.dist.enabled:
                rng["cuda_ranks"] = D.gather([rng["cuda"]], self.dist)
        if not self.main:
            return
        save_checkpoint(self.out / name, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "config": cfg_dict, "vocab": vocab.to_dict(), "preprocess": preprocess.to_dict(),
            "train_state": state.to_dict(), "rng": rng,
        })

    def plot(self) -> None:
        if self.main:
            plot_run(self.log_path, self.out, self.curve_keys)
