"""Join trained checkpoints into one ensemble checkpoint (models/ensemble.py decodes it).

The members must be the same model trained differently (another ``train.seed``, schedule, …):
same vocabulary, same preprocessing, same encoder/attention/decoder settings and the same frozen
encoder weights. The result is an ordinary checkpoint (state dict + config + vocabulary,
``weights_only``), whose config says ``decoder.ensemble = N``: ``evaluate``, ``caption``,
``inspect``, ``serve`` and the API load it like any other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from showattend import config as C
from showattend.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from showattend.io import sha256_file
from showattend.loading import load_model

__all__ = ["join_checkpoints", "joinable", "EnsembleError"]

_SAME_SECTIONS = ("encoder", "attention", "decoder")


class EnsembleError(ValueError):
    """Checkpoints that cannot decode as one (one-line message)."""


def _member(path: str | Path) -> tuple[dict[str, Any], C.Config]:
    ck = load_checkpoint(path)
    try:
        cfg = C.from_dict(C.Config, ck["config"])
    except (C.ConfigError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{ck['path']}: {str(exc).splitlines()[0]}") from None
    if "shipped" in ck:
        raise EnsembleError(f"{ck['path']} is a shipped model file; join the training "
                            f"checkpoints it was exported from")
    if cfg.decoder.ensemble != 1:
        raise EnsembleError(f"{ck['path']} is already an ensemble ({cfg.decoder.ensemble} "
                            f"decoders); join its members instead")
    if not joinable(cfg):
        raise EnsembleError(f"{ck['path']}: ensembles are built from soft-attention models "
                            f"without self-attention layers (attention.kind "
                            f"{cfg.attention.kind!r})")
    return ck, cfg


def joinable(cfg: C.Config) -> bool:
    """Whether runs of ``cfg`` can be ensemble members: deterministic attention (soft and its
    family, not hard) and no self-attention layers (models/ensemble.py decodes those only)."""
    return cfg.attention.kind not in ("hard", "glimpse_hard") \
        and not cfg.encoder.self_attention_layers


def _check_same(first: dict[str, Any], ck: dict[str, Any], cfg0: C.Config, cfg: C.Config) -> None:
    where = f"{ck['path']} and {first['path']}"
    if ck["vocab"] != first["vocab"]:
        raise EnsembleError(f"{where} have different vocabularies (train them on the same "
                            f"captions with the same data.min_word_freq)")
    if ck["preprocess"] != first["preprocess"]:
        raise EnsembleError(f"{where} preprocess images differently")
    for section in _SAME_SECTIONS:
        a, b = C.to_dict(getattr(cfg0, section)), C.to_dict(getattr(cfg, section))
        diff = sorted(k for k in a if a[k] != b.get(k))
        if diff:
            raise EnsembleError(f"{where} differ in {section}.{diff[0]} "
                                f"({a[diff[0]]!r} vs {b[diff[0]]!r})")
    enc0 = {k: v for k, v in first["model"].items() if k.startswith("encoder.")}
    for k, v in enc0.items():
        w = ck["model"].get(k)
        if w is None or w.shape != v.shape or not torch.equal(w, v):
            raise EnsembleError(f"{where} have different encoder weights ({k}): members must "
                                f"share one frozen encoder")


def join_checkpoints(paths: list[str | Path], out: str | Path, name: str = "") -> dict[str, Any]:
    """Write the ensemble of ``paths`` (≥ 2 checkpoints or run directories) to ``out``.
    Returns a summary (members, sha256, size). The file is written atomically and loaded back
    once before this returns, so a file that exists is a working model."""
    if len(paths) < 2:
        raise EnsembleError("an ensemble needs at least 2 checkpoints")
    members = [_member(p) for p in paths]
    (first, cfg0) = members[0]
    for ck, cfg in members[1:]:
        _check_same(first, ck, cfg0, cfg)
    state = {k: v for k, v in first["model"].items() if not k.startswith("decoder.")}
    for i, (ck, _) in enumerate(members):
        for k, v in ck["model"].items():
            if k.startswith("decoder."):
                state[f"decoder.members.{i}.{k[len('decoder.'):]}"] = v
    out = Path(out)
    config = C.to_dict(cfg0)
    config["decoder"] = {**config["decoder"], "ensemble": len(members)}
    config.update(name=name or config["name"] + f"_x{len(members)}", out_dir=str(out.parent))
    config["train"] = {**config["train"], "init": ""}
    info = [{"path": str(ck["path"]), "seed": cfg.train.seed,
             "best_val": ck.get("train_state", {}).get("best")} for ck, cfg in members]
    save_checkpoint(out, {"config": config, "vocab": first["vocab"],
                          "preprocess": first["preprocess"], "model": state,
                          "ensemble": info})
    try:
        load_model(out, device="cpu")
    except CheckpointError:
        out.unlink(missing_ok=True)
        raise
    return {"file": str(out), "members": [m["path"] for m in info],
            "sha256": sha256_file(out), "size": out.stat().st_size}
