"""Photoshop (PSD) files: the picture the file shows, from its merged image or from its layers.

A PSD holds the layers and, after them, a "merged" image of the whole document. Pillow opens the
merged image (``Image.open`` lands on it; the layers are frames 1..n, and there is no frame 0 to
seek to). Two things Pillow leaves to the caller:

- Photoshop saved without "Maximize Compatibility" writes a blank (white) merged image and says so
  in image resource 1057 (``hasRealMergedData = 0``). Such a file is composited here from its
  layers: visible raster layers (group visibility included), at their opacity, normal blending.
  Blend modes, masks, clipping and effects are not rendered; the caller is told via a warning.
- A fourth channel of an RGB file is the merged image's transparency only when the layer count is
  negative (spec: "the first alpha channel contains the transparency data for the merged
  result"); otherwise it is a saved selection or spot channel and must not erase pixels.

Layers are decoded from the file here (8-bit RGB / greyscale, raw, RLE or ZIP) rather than through
Pillow's layer frames, which assign channel data in file order (Photoshop writes alpha first) and
skip layers with a mask channel.
"""

from __future__ import annotations

import struct
import warnings
import zlib
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from PIL import Image

_VERSION_INFO = 1057  # image resource id of "version info" (holds hasRealMergedData)
_COLOUR_MODES = {1: "greyscale", 3: "RGB"}  # the ones whose layers are composited here


class PsdWarning(UserWarning):
    """The PSD was rendered approximately (layers composited without effects)."""


@dataclass
class _Layer:
    top: int
    left: int
    bottom: int
    right: int
    channels: list[tuple[int, int]]  # (channel id, bytes incl. the 2-byte compression field)
    blend: bytes
    opacity: int  # 0..255
    hidden: bool
    section: int  # 0 layer, 1/2 open/closed group (its top marker), 3 end-of-group marker

    @property
    def size(self) -> tuple[int, int]:
        return self.right - self.left, self.bottom - self.top  # (W, H)


def _read(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise SyntaxError("PSD file is truncated")
    return data


def _u(f: BinaryIO, fmt: str) -> int:
    return struct.unpack(">" + fmt, _read(f, struct.calcsize(fmt)))[0]


def has_real_merged_data(resources: list[tuple[int, bytes, bytes]]) -> bool:
    """False when resource 1057 says the merged image is a blank placeholder."""
    for rid, _name, data in resources:
        if rid == _VERSION_INFO and len(data) >= 5:
            return data[4] != 0  # u32 version, then the hasRealMergedData byte
    return True  # no version info (older writers, GIMP, Krita): the merged image is real


def _layer_count(f: BinaryIO) -> tuple[tuple[int, int, int, int], int]:
    """Header (height, width, depth, colour mode) and the signed layer count (0: no layers).

    Leaves ``f`` at the first layer record.
    """
    f.seek(0)
    head = _read(f, 26)
    _channels, height, width, depth, mode = struct.unpack(">HIIHH", head[12:26])
    f.seek(_u(f, "I"), 1)  # colour mode data
    f.seek(_u(f, "I"), 1)  # image resources
    if _u(f, "I") == 0 or _u(f, "I") == 0:  # layer and mask section, then its layer info
        return (height, width, depth, mode), 0
    return (height, width, depth, mode), _u(f, "h")


def _layer_section(f: BinaryIO) -> tuple[tuple[int, int, int, int], int, list[_Layer]]:
    """Header, signed layer count and layer records; leaves ``f`` at the channel image data."""
    head, count = _layer_count(f)
    layers = []
    for _ in range(abs(count)):
        top, left, bottom, right = struct.unpack(">iiii", _read(f, 16))
        n_ch = _u(f, "H")
        chans = [struct.unpack(">hI", _read(f, 6)) for _ in range(n_ch)]
        _sig, blend, opacity, _clip, flags, _pad = struct.unpack(">4s4sBBBB", _read(f, 12))
        extra = _read(f, _u(f, "I"))
        layers.append(_Layer(top, left, bottom, right, chans, blend, opacity,
                             hidden=bool(flags & 0x02), section=_section_type(extra)))
    return head, count, layers


def _section_type(extra: bytes) -> int:
    """Group marker type from the 'lsct' block among a layer record's extra data (0: none)."""
    pos = 4 + struct.unpack_from(">I", extra, 0)[0]  # layer mask data
    pos += 4 + struct.unpack_from(">I", extra, pos)[0]  # blending ranges
    pos += (1 + extra[pos] + 3) // 4 * 4  # Pascal name padded to a multiple of 4
    while pos + 12 <= len(extra):  # additional layer information blocks: sig, key, length, data
        key = extra[pos + 4: pos + 8]
        n = struct.unpack_from(">I", extra, pos + 8)[0]
        if key in (b"lsct", b"lsdk") and n >= 4:
            return struct.unpack_from(">I", extra, pos + 12)[0]
        pos += 12 + n  # the spec's length is already rounded up to an even count
    return 0


def _decode_channel(f: BinaryIO, nbytes: int, w: int, h: int) -> np.ndarray:
    """One 8-bit channel of a layer → (H, W) uint8."""
    kind = _u(f, "H")
    data = _read(f, nbytes - 2)
    if kind == 0:
        raw = data[: w * h]
    elif kind == 1:  # PackBits per row, preceded by a u16 byte count per row
        raw = Image.frombytes("L", (w, h), data[2 * h:], "packbits", "L").tobytes()
    elif kind in (2, 3):  # ZIP, without / with per-row delta prediction
        raw = zlib.decompress(data)[: w * h]
    else:
        raise SyntaxError(f"unknown PSD layer compression {kind}")
    arr = np.frombuffer(raw, dtype=np.uint8)
    if arr.size != w * h:
        raise SyntaxError("PSD layer channel is shorter than its layer")
    arr = arr.reshape(h, w)
    if kind == 3:
        arr = np.cumsum(arr, axis=1, dtype=np.uint64).astype(np.uint8)  # undo the row deltas
    return arr


def composite_layers(f: BinaryIO) -> Image.Image | None:
    """RGBA composite of the visible raster layers (normal blending), or None without layers."""
    (height, width, depth, mode), _count, layers = _layer_section(f)
    if not layers:
        return None
    if depth != 8 or mode not in _COLOUR_MODES:
        raise SyntaxError(f"PSD was saved without a merged image and its layers ({depth}-bit, "
                          f"colour mode {mode}) cannot be composited here; re-save it with "
                          f"Maximize Compatibility")
    # Records run bottom → top; a group's own record (type 1/2) sits above its members and the
    # end marker (type 3) below them, so walking top → bottom tells each layer its groups.
    visible = [False] * len(layers)
    hidden_groups: list[bool] = []
    for i in reversed(range(len(layers))):
        lay = layers[i]
        if lay.section in (1, 2):
            hidden_groups.append(lay.hidden or (bool(hidden_groups) and hidden_groups[-1]))
        elif lay.section == 3:
            if hidden_groups:
                hidden_groups.pop()
        else:
            visible[i] = not lay.hidden and not (hidden_groups and hidden_groups[-1])
    canvas = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    approximated = False
    for lay, show in zip(layers, visible):
        w, h = lay.size
        planes: dict[int, np.ndarray] = {}
        for cid, nbytes in lay.channels:
            if not show or w <= 0 or h <= 0 or cid < -1:  # hidden, group marker, mask (-2, -3)
                f.seek(nbytes, 1)
                approximated |= show and cid < -1
                continue
            planes[cid] = _decode_channel(f, nbytes, w, h)
        if 0 not in planes:
            continue
        colour = [planes.get(c, planes[0]) for c in ((0, 1, 2) if mode == 3 else (0, 0, 0))]
        alpha = planes.get(-1, np.full((h, w), 255, np.uint8)).astype(np.uint16)
        alpha = (alpha * lay.opacity + 127) // 255
        rgba = np.dstack([*colour, alpha.astype(np.uint8)])  # (H, W, 4)
        approximated |= lay.blend not in (b"norm", b"pass")
        layer_img = Image.fromarray(rgba)
        # alpha_composite clips to the canvas; layers may extend past it or start at negatives
        x0, y0 = max(lay.left, 0), max(lay.top, 0)
        crop = layer_img.crop((x0 - lay.left, y0 - lay.top,
                               min(w, width - lay.left), min(h, height - lay.top)))
        if crop.width > 0 and crop.height > 0:
            canvas.alpha_composite(crop, (x0, y0))
    if approximated:
        warnings.warn("PSD has no merged image; composited its layers without blend modes, masks "
                      "or effects", PsdWarning, stacklevel=2)
    return canvas


def merged_alpha_is_transparency(f: BinaryIO) -> bool:
    """True when the merged image's first alpha channel is its transparency (negative count)."""
    try:
        return _layer_count(f)[1] < 0
    except (SyntaxError, struct.error):  # a damaged layer section: keep the readable picture
        return False


def psd_image(im: Image.Image, f: BinaryIO) -> Image.Image:
    """The picture an opened PSD shows: its merged image, or its layers composited when the
    merged image is a blank placeholder. ``f`` is the file, opened separately for reading."""
    if not has_real_merged_data(getattr(im, "resources", [])):
        layered = composite_layers(f)
        if layered is not None:
            return layered
    im.load()
    if im.mode == "RGBA" and not merged_alpha_is_transparency(f):
        return im.convert("RGB")  # the 4th channel is a selection / spot channel
    return im
