"""One checkpoint format for training, evaluation, the CLI and the API.

A checkpoint is a plain dict of tensors and JSON-able values — state dicts, the resolved config,
the vocabulary, the preprocessing, counters and RNG state — never a pickled module. It is loaded
with ``torch.load(weights_only=True)``, so a file that would execute code is refused.
"""

from __future__ import annotations

import pickle
import re
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
    _verify_archive(p)
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        blocked = re.search(r"unsupported GLOBAL (\S+)", text, re.IGNORECASE)
        if blocked or "Unsupported global" in text:
            what = f" ({blocked.group(1)})" if blocked else ""
            raise CheckpointError(
                f"refusing to load {p}: it contains Python objects that would run code when "
                f"unpickled{what}; only showattend checkpoints (loaded with weights_only=True) "
                f"are accepted"
            ) from None
        if _is_plain_pickle(p):
            raise CheckpointError(
                f"refusing to load {p}: it is a plain Python pickle, which could run code when "
                f"unpickled; only showattend checkpoints (loaded with weights_only=True) are "
                f"accepted"
            ) from None
        raise CheckpointError(f"{p} is not a showattend checkpoint (corrupt, or another kind "
                              f"of file)") from None
    except Exception as exc:  # noqa: BLE001 - a damaged archive fails in many ways inside torch
        raise CheckpointError(f"corrupt or truncated checkpoint {p}: {_first_line(exc)}") from None
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _is_plain_pickle(p: Path) -> bool:
    # Pickle protocol 2+ streams start with the PROTO opcode; torch's own format is a zip archive.
    with open(p, "rb") as fh:
        return fh.read(1) == b"\x80"


def _verify_archive(p: Path) -> None:
    """Check the CRC-32 of every member of a (zip-format) checkpoint before unpickling it.

    ``torch.load`` does not verify the archive's checksums, so flipped bytes inside tensor data
    load silently as wrong weights and flipped bytes elsewhere raise arbitrary errors; reading
    the archive once through :mod:`zipfile` turns both into one clear error.
    """
    try:
        if not zipfile.is_zipfile(p):
            with open(p, "rb") as fh:
                if fh.read(4) == b"PK\x03\x04":  # a zip archive whose end is missing
                    raise zipfile.BadZipFile("the archive's directory is missing")
            return  # legacy or foreign format: torch.load(weights_only=True) decides
        with zipfile.ZipFile(p) as zf:
            bad = zf.testzip()
    except Exception as exc:  # noqa: BLE001 - BadZipFile, NotImplementedError, UnicodeError...
        raise CheckpointError(f"corrupt or truncated checkpoint {p}: {_first_line(exc)}") from None
    if bad is not None:
        raise CheckpointError(f"corrupt checkpoint {p}: checksum mismatch in {bad}")
