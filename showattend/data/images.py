"""Image loading and the one preprocessing pipeline shared by training, evaluation, CLI and API.

:func:`load_image` turns whatever sits at a path into an RGB :class:`PIL.Image.Image` or raises
:class:`ImageLoadError` with a one-line message; :class:`Preprocessor` maps that image to the exact
pixels the model sees (:meth:`Preprocessor.geometry`) and to the normalised tensor it consumes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:  # torch is imported lazily so that loading images does not require it
    import torch

log = logging.getLogger(__name__)

RESIZE_MODES = ("stretch", "crop")

# Modes whose samples do not fit in 8 bits; PIL's own convert("RGB") clips them instead of scaling.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


# Extensions Pillow registers for formats it opens but cannot decode on its own (EPS needs
# Ghostscript; BUFR, GRIB, HDF5 and WMF need a handler plugged in) or that are not pictures.
_NOT_DECODABLE = frozenset({".eps", ".ps", ".pdf", ".bufr", ".grib", ".h5", ".hdf", ".wmf",
                            ".emf", ".mpg", ".mpeg"})


@functools.cache
def image_extensions() -> frozenset[str]:
    """Lower-case file extensions of every format :func:`load_image` reads (for folder scans)."""
    Image.init()  # registers all plugins, so the list does not depend on what was imported
    exts = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    # SPIDER registers no extension of its own; ".spi" is the one its users give it.
    return frozenset((exts - _NOT_DECODABLE) | {".spi"})


class ImageLoadError(ValueError):
    """An image file could not be read; the message is ``cannot read image PATH: reason``."""


def _error(path: str | os.PathLike, reason: str) -> ImageLoadError:
    # Decoder messages sometimes span lines; the CLI prints exactly one line per error.
    return ImageLoadError(f"cannot read image {path}: {' '.join(str(reason).split())}")


def _scale_to_uint8(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Linearly map ``[lo, hi]`` to ``[0, 255]`` with rounding (not clipping the top bits away)."""
    arr = np.nan_to_num(arr.astype(np.float64), nan=lo, posinf=hi, neginf=lo)
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    scaled = (np.clip(arr, lo, hi) - lo) * (255.0 / (hi - lo))
    return np.rint(scaled).astype(np.uint8)


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    """Greyscale deeper than 8 bits (I;16*, I, F) → RGB, scaled to 0..255 rather than clipped."""
    arr = np.asarray(img)
    if img.mode in _SIXTEEN_BIT_MODES:
        grey = _scale_to_uint8(arr, 0.0, 65535.0)
    elif img.mode == "I":
        # "I" is how PIL used to (and some plugins still do) represent 16-bit greyscale, so values
        # within 0..65535 are read as 16-bit; anything else gets its own min-max range.
        lo, hi = int(arr.min()), int(arr.max())
        grey = (
            _scale_to_uint8(arr, 0.0, 65535.0)
            if lo >= 0 and hi <= 65535
            else _scale_to_uint8(arr, float(lo), float(hi))
        )
    else:  # "F": floats in [0, 1] are intensities; whole numbers in [0, 255] are 8-bit samples
        # stored as floats (SPIDER, float TIFF written from 8-bit data); any other range is
        # stretched to fit.
        finite = arr[np.isfinite(arr)]
        lo = float(finite.min()) if finite.size else 0.0
        hi = float(finite.max()) if finite.size else 1.0
        if lo >= 0.0 and hi <= 1.0:
            grey = _scale_to_uint8(arr, 0.0, 1.0)
        elif lo >= 0.0 and hi <= 255.0 and bool(np.all(finite == np.round(finite))):
            grey = _scale_to_uint8(arr, 0.0, 255.0)
        else:
            grey = _scale_to_uint8(arr, lo, hi)
    return Image.fromarray(grey).convert("RGB")  # 2-D uint8 array → mode "L"


def to_rgb(img: Image.Image) -> Image.Image:
    """Return a new RGB copy of ``img``: alpha is composited on white, deep greyscale is scaled.

    Transparent regions become white rather than whatever colour PIL keeps under alpha = 0, which
    is often black or garbage and would otherwise leak into the model's input.
    """
    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        return _high_depth_to_rgb(img)
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    # L, 1, P, CMYK (Adobe inversion is handled by the JPEG decoder), YCbCr, LAB, HSV.
    return img.convert("RGB")


def load_image(path: str | os.PathLike, max_pixels: int | None = None) -> Image.Image:
    """Load the image at ``path`` as a fully decoded RGB image, honouring its EXIF orientation.

    Reads every format Pillow can open. Multi-image files give their first image (animated GIF /
    WebP / APNG, multi-page TIFF, SPIDER stacks); ICO / ICNS give their largest size; PSD gives the
    picture the document shows (see :mod:`showattend.data.psd`). ``max_pixels`` (default:
    ``PIL.Image.MAX_IMAGE_PIXELS`` at call time; ``None`` there means no limit) guards against
    decompression bombs: the size is checked from the header, before any pixel is decoded. Every
    failure (missing path, directory, empty, truncated, corrupt or non-image file, too many
    pixels) raises :class:`ImageLoadError`.

    Warnings the decoders raise (bad TIFF tags, corrupt EXIF, palette transparency...) become at
    most one log line per file on the ``showattend.data.images`` logger, never a flood on stderr.
    ``warnings.catch_warnings`` is process-global: call this from one thread per process
    (DataLoader workers are processes).
    """
    p = Path(path)
    try:
        if p.is_dir():
            raise _error(p, "is a directory")
        if not p.exists():
            raise _error(p, "no such file")
        if p.stat().st_size == 0:
            raise _error(p, "empty file")
    except OSError as exc:  # permission denied, path too long, ...
        raise _error(p, exc.strerror or exc) from exc

    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    c_lines: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # record every one; we report them once, below
        # We raise our own error for oversized images; PIL's warning would only add noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with _c_stderr(c_lines):  # libtiff & co. write their warnings to fd 2 directly
                return _decode(p, limit)
        finally:
            _report_warnings(p, [str(w.message) for w in caught] + c_lines)


def _decode(p: Path, limit: int | None) -> Image.Image:
    try:
        with Image.open(p) as im:
            width, height = im.size
            if limit is not None and width * height > limit:
                raise _error(
                    p, f"{width}x{height} pixels exceeds the limit of {limit} "
                    "(possible decompression bomb)"
                )
            # No seek(0): Image.open already stands on the first image, and seeking there is not
            # a no-op everywhere (PSD numbers its layers from 1, so frame 0 is "outside sequence";
            # a single SPIDER image refuses any seek).
            if im.format == "PSD":
                from showattend.data.psd import psd_image

                with open(p, "rb") as f:
                    img = psd_image(im, f)
            else:
                im.load()
                img = im
            try:
                oriented = ImageOps.exif_transpose(img)
            except Exception:  # noqa: BLE001 - a broken EXIF block should not lose the pixels
                oriented = img
            # to_rgb copies, so nothing returned refers to the file being closed here.
            return to_rgb(oriented)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as exc:
        raise _error(p, f"{exc} (possible decompression bomb)") from exc
    except Exception as exc:  # noqa: BLE001 - decoders raise OSError, SyntaxError, struct.error...
        reason = str(exc) or type(exc).__name__
        raise _error(p, reason) from exc


@contextlib.contextmanager
def _c_stderr(sink: list[str]):
    """Collect what C code writes to file descriptor 2 meanwhile (libtiff's "unknown field
    with tag" warnings bypass Python) into ``sink``, one entry per non-empty line. Process-wide,
    like ``warnings.catch_warnings``: one decoding thread per process."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no fd 2 (daemons, some embedders)
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read(1 << 16).decode("utf-8", "replace")
            sink.extend(line.strip() for line in text.splitlines() if line.strip())


def _report_warnings(path: Path, caught: list[str]) -> None:
    """One log line for all the warnings decoding ``path`` raised (none when there were none)."""
    messages = list(dict.fromkeys(" ".join(m.split()) for m in caught))
    if not messages:
        return
    first = messages[0] if len(messages[0]) <= 160 else messages[0][:157] + "..."
    more = f" (and {len(messages) - 1} more)" if len(messages) > 1 else ""
    log.warning("%s: %s%s", path, first, more)


@dataclass(frozen=True)
class Preprocessor:
    """Image → model input: resize geometry, then per-channel normalisation.

    ``size`` is (H, W); ``mean`` / ``std`` are per RGB channel on the 0..1 scale and come from the
    encoder's weights. ``resize="stretch"`` resizes to exactly (H, W), ignoring the aspect ratio;
    ``resize="crop"`` scales the shorter side to fit and centre-crops the other.
    """

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "stretch"

    def __post_init__(self) -> None:
        # Normalise lists (from JSON / checkpoints) to tuples so equality and hashing behave.
        try:
            size = tuple(int(v) for v in self.size)
            mean = tuple(float(v) for v in self.mean)
            std = tuple(float(v) for v in self.std)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"invalid Preprocessor fields: {exc}") from exc
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"Preprocessor size must be two positive ints (H, W): {self.size!r}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError("Preprocessor mean and std must have 3 values (R, G, B)")
        if min(std) <= 0:
            raise ValueError(f"Preprocessor std must be positive, got {std!r}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"Preprocessor resize must be one of {RESIZE_MODES}: {self.resize!r}")
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    def _as_image(self, img_or_path: Image.Image | str | os.PathLike) -> Image.Image:
        if isinstance(img_or_path, Image.Image):
            return img_or_path if img_or_path.mode == "RGB" else to_rgb(img_or_path)
        return load_image(img_or_path)

    def geometry(self, img: Image.Image | str | os.PathLike) -> Image.Image:
        """The exact RGB image (W, H = size[::-1]) the model sees, before normalisation."""
        img = self._as_image(img)
        out_h, out_w = self.size
        in_w, in_h = img.size
        if self.resize == "stretch":
            # PIL returns an unchanged copy when the size already matches (synthetic data).
            return img.resize((out_w, out_h), Image.Resampling.BILINEAR)
        # crop: scale so both sides cover the target, then cut the centre.
        scale = max(out_w / in_w, out_h / in_h)
        new_w = max(out_w, round(in_w * scale))
        new_h = max(out_h, round(in_h * scale))
        resized = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
        left = (new_w - out_w) // 2
        top = (new_h - out_h) // 2
        return resized.crop((left, top, left + out_w, top + out_h))

    def map_box(
        self, box: tuple[float, float, float, float], image_size: tuple[int, int]
    ) -> tuple[float, float, float, float] | None:
        """Where a box of the original image lands in :meth:`geometry`'s output, or ``None``.

        ``box`` is (x0, y0, x1, y1) in continuous pixel coordinates of the original image: pixel
        column i spans [i, i+1), so a 1-based inclusive box xmin..xmax is (xmin - 1, xmax).
        ``image_size`` is the original image's (width, height), as PIL's ``Image.size``. The result
        is in the same coordinates of the model-input image (size[::-1] wide/high), clipped to it;
        ``None`` when nothing of the box is left (cropped away). This is the one place that maps
        boxes: it follows :meth:`geometry` step by step, so both must change together.
        """
        x0, y0, x1, y1 = (float(v) for v in box)
        in_w, in_h = (int(v) for v in image_size)
        if in_w < 1 or in_h < 1:
            raise ValueError(f"map_box: image size must be positive (width, height): {image_size}")
        out_h, out_w = self.size
        left = top = 0
        if self.resize == "stretch":
            new_w, new_h = out_w, out_h
        else:  # the same sizes and offsets as geometry()'s crop branch
            scale = max(out_w / in_w, out_h / in_h)
            new_w = max(out_w, round(in_w * scale))
            new_h = max(out_h, round(in_h * scale))
            left, top = (new_w - out_w) // 2, (new_h - out_h) // 2
        # new_w / in_w, not `scale`: the resize to the rounded size is what moves the pixels.
        sx, sy = new_w / in_w, new_h / in_h
        x0, x1 = (min(max(x * sx - left, 0.0), out_w) for x in (x0, x1))
        y0, y1 = (min(max(y * sy - top, 0.0), out_h) for y in (y0, y1))
        if not (x1 > x0 and y1 > y0):  # also rejects NaN
            return None
        return (x0, y0, x1, y1)

    def to_tensor(self, img: Image.Image | str | os.PathLike) -> torch.Tensor:
        """Float tensor (3, H, W): ``(geometry(img) / 255 - mean) / std``."""
        return self.normalize(self.view(img))

    def __call__(self, img_or_path: Image.Image | str | os.PathLike) -> torch.Tensor:
        """Path or image → normalised tensor (3, H, W); paths go through :func:`load_image`."""
        return self.to_tensor(img_or_path)

    def view(self, img_or_path: Image.Image | str | os.PathLike) -> np.ndarray:
        """uint8 array (H, W, 3) of :meth:`geometry`: what a prepared image store holds, and what
        attention overlays are drawn on."""
        return np.array(self.geometry(img_or_path), dtype=np.uint8)  # (H, W, 3)

    def normalize(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 pixels (..., H, W, 3) from :meth:`view` → float tensor (..., 3, H, W).

        The second half of the one preprocessing: images decoded now and images read back from a
        prepared uint8 store go through this same code, so both give bit-identical inputs. It is
        numpy on purpose: per-image torch ops on a busy CPU cost more in thread hand-offs than in
        arithmetic (measured 25 vs 1,000+ images/s with 2 threads on 2 shared cores).
        """
        import torch

        if isinstance(pixels, torch.Tensor):
            pixels = pixels.cpu().numpy()
        arr = np.asarray(pixels)
        if arr.dtype != np.uint8 or arr.ndim < 3 or arr.shape[-1] != 3:
            raise ValueError(f"normalize expects uint8 pixels (..., H, W, 3), got {arr.dtype} "
                             f"{arr.shape}")
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        normed = (arr.astype(np.float32) / 255.0 - mean) / std  # (..., H, W, 3)
        return torch.from_numpy(np.ascontiguousarray(np.moveaxis(normed, -1, -3)))  # (..., 3, H, W)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able description, stored inside checkpoints."""
        return {
            "size": list(self.size),
            "mean": list(self.mean),
            "std": list(self.std),
            "resize": self.resize,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessor:
        """Inverse of :meth:`to_dict`; unknown or missing keys raise ``ValueError``."""
        if not isinstance(d, dict):
            raise ValueError(f"Preprocessor description must be a dict, got {type(d).__name__}")
        known = {"size", "mean", "std", "resize"}
        unknown = sorted(set(d) - known)
        missing = sorted({"size", "mean", "std"} - set(d))
        if unknown or missing:
            raise ValueError(f"bad Preprocessor description: unknown {unknown}, missing {missing}")
        # __post_init__ converts and validates the (JSON list) values.
        return cls(size=d["size"], mean=d["mean"], std=d["std"], resize=d.get("resize", "stretch"))
