"""One checkpoint format for training, evaluation, the CLI and the API.

A checkpoint is a plain dict of tensors and JSON-able values — state dicts, the resolved config,
the vocabulary, the preprocessing, counters and RNG state — never a pickled module. It is loaded
with ``torch.load(weights_only=True)``, so a file that would execute code is refused.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from showattend.io import atomic_torch_save

FORMAT = "showattend-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint cannot be used (one-line message naming the file)."""


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` (plus format tags) atomically."""
    atomic_torch_save({"format": FORMAT, "format_version": FORMAT_VERSION, **payload}, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate a checkpoint; every failure is a CheckpointError with a one-line reason."""
    p = Path(path)
    if p.is_dir():
        for name in ("best.pt", "last.pt"):
            if (p / name).is_file():
                p = p / name
                break
        else:
            raise CheckpointError(f"no best.pt or last.pt in directory {p}")
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise CheckpointError(
                f"refusing to load {p}: it contains Python objects that would run code when "
                f"unpickled (weights_only=True); only showattend checkpoints are accepted"
            ) from None
        raise CheckpointError(f"corrupt checkpoint {p}: {first}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"corrupt or truncated checkpoint {p}: {msg}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{p} is not a showattend checkpoint")
    version = ckpt.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{p} has checkpoint format version {version}, this showattend reads version "
            f"{FORMAT_VERSION}"
        )
    for key in ("model", "config", "vocab", "preprocess"):
        if key not in ckpt:
            raise CheckpointError(f"checkpoint {p} lacks '{key}'")
    ckpt["path"] = str(p)
    return ckpt
