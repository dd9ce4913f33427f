"""Image files decoded and preprocessed by DataLoader workers while the model runs.

``caption`` on a folder of photos used to decode each JPEG in the main process between two model
calls, so the CPU cores the model was not using sat idle during decoding and the model sat idle
during decoding. :func:`image_batches` hands decoding, resizing and normalisation (the one
:class:`~showattend.data.images.Preprocessor`) to worker processes that run one batch ahead.
A file that cannot be read is a value in the batch (its reason), never an exception that would
stop the loader: one bad photo in a folder of thousands costs that photo only.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from showattend.data.images import ImageLoadError, Preprocessor, image_extensions, load_image


@dataclass
class LoadedImage:
    """One file after loading: either ``view`` + ``pixels`` or ``error``."""

    path: Path
    view: np.ndarray | None  # (H, W, 3) uint8: what the model saw (overlays are drawn on it)
    pixels: torch.Tensor | None  # (3, H, W) normalised model input
    error: str | None
    size: tuple[int, int] | None = None  # (width, height) of the photo as shown (EXIF-rotated)


class ImageFiles(Dataset):
    """Paths → :class:`LoadedImage`, through :func:`load_image` and the model's preprocessing."""

    def __init__(self, paths: Sequence[Path], preprocess: Preprocessor):
        self.paths = list(paths)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> LoadedImage:
        path = self.paths[i]
        try:
            img = load_image(path)
            view = self.preprocess.view(img)  # (H, W, 3)
        except ImageLoadError as exc:
            return LoadedImage(path, None, None, str(exc))
        return LoadedImage(path, view, self.preprocess.normalize(view), None, img.size)


def _keep_list(items: list[LoadedImage]) -> list[LoadedImage]:
    return items


def default_workers(n_images: int, batch_size: int) -> int:
    """Worker processes worth starting: none for a single batch (start-up would cost more than
    it hides), else one per core up to two — the model's own threads need the rest."""
    if n_images <= batch_size:
        return 0
    return max(1, min(2, (os.cpu_count() or 1) - 1))


def image_batches(paths: Sequence[Path], preprocess: Preprocessor, batch_size: int = 16,
                  workers: int | None = None) -> Iterator[list[LoadedImage]]:
    """Batches of loaded images in path order; ``workers=None`` picks :func:`default_workers`."""
    if workers is None:
        workers = default_workers(len(paths), batch_size)
    loader = DataLoader(ImageFiles(paths, preprocess), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=_keep_list,
                        prefetch_factor=2 if workers else None, persistent_workers=False)
    yield from loader


def iter_image_paths(inputs: Sequence[str | os.PathLike]) -> Iterator[Path]:
    """Expand folders (recursively, sorted) to the files of every format load_image reads; files
    given by name pass through whatever their extension."""
    extensions = image_extensions()
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file() and f.suffix.lower() in extensions:
                    yield f
        else:
            yield p
