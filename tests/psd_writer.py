"""A minimal Photoshop (PSD, version 1) writer for test fixtures, written from Adobe's file spec.

Pillow reads PSD but cannot write it. This writes 8-bit RGB documents: a merged image (raw or
PackBits), optional resource 1057 (hasRealMergedData), and layers with alpha, opacity,
visibility, blend mode, groups (section dividers) and raw / PackBits / ZIP channel data.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np


@dataclass
class Layer:
    pixels: np.ndarray  # (h, w, 4) uint8 RGBA
    top: int = 0
    left: int = 0
    opacity: int = 255
    visible: bool = True
    blend: bytes = b"norm"
    compression: int = 0  # 0 raw, 1 PackBits, 2 ZIP, 3 ZIP with prediction
    name: str = "layer"
    section: int = 0  # 1 group (record above its members), 3 end-of-group marker (below them)


def group(name: str = "group", visible: bool = True) -> Layer:
    """The record of a group (goes above its members in bottom → top order)."""
    return Layer(np.zeros((0, 0, 4), np.uint8), name=name, visible=visible, section=1)


def group_end() -> Layer:
    """The end-of-group marker (goes below the group's members)."""
    return Layer(np.zeros((0, 0, 4), np.uint8), name="</Layer group>", section=3)


def packbits(rows: np.ndarray) -> tuple[list[int], bytes]:
    """PackBits-encode each row (literal runs and repeat runs); returns (row byte counts, data)."""
    counts, out = [], bytearray()
    for row in rows:
        enc, i, data = bytearray(), 0, bytes(row)
        while i < len(data):
            run = 1
            while i + run < len(data) and run < 128 and data[i + run] == data[i]:
                run += 1
            if run >= 3:
                enc += bytes([257 - run, data[i]])  # -(run-1) as a signed byte
                i += run
                continue
            j = i  # literal run up to the next repeat of 3 or 128 bytes
            while j < len(data) and j - i < 128 and not (
                    j + 2 < len(data) and data[j] == data[j + 1] == data[j + 2]):
                j += 1
            enc += bytes([j - i - 1]) + data[i:j]
            i = j
        counts.append(len(enc))
        out += enc
    return counts, bytes(out)


def _channel(plane: np.ndarray, compression: int) -> bytes:
    h, w = plane.shape
    if compression == 0:
        body = plane.tobytes()
    elif compression == 1:
        counts, data = packbits(plane)
        body = struct.pack(f">{h}H", *counts) + data
    elif compression == 2:
        body = zlib.compress(plane.tobytes())
    else:
        delta = np.diff(plane.astype(np.int16), axis=1, prepend=0).astype(np.uint8)
        body = zlib.compress(delta.tobytes())
    return struct.pack(">H", compression) + body


def _pascal(name: str, multiple: int) -> bytes:
    raw = name.encode("latin-1")[:255]
    data = bytes([len(raw)]) + raw
    return data + b"\0" * (-len(data) % multiple)


def _layer_record(lay: Layer, channel_lengths: list[tuple[int, int]]) -> bytes:
    h, w = lay.pixels.shape[:2]
    rec = struct.pack(">iiiiH", lay.top, lay.left, lay.top + h, lay.left + w, len(channel_lengths))
    rec += b"".join(struct.pack(">hI", cid, n) for cid, n in channel_lengths)
    flags = 0 if lay.visible else 0x02
    rec += b"8BIM" + lay.blend + struct.pack(">BBBB", lay.opacity, 0, flags, 0)
    extra = struct.pack(">I", 0) + struct.pack(">I", 0) + _pascal(lay.name, 4)
    if lay.section:
        extra += b"8BIM" + b"lsct" + struct.pack(">II", 4, lay.section)
    return rec + struct.pack(">I", len(extra)) + extra


def psd_bytes(merged: np.ndarray, layers: list[Layer] = (), real_merged: bool | None = None,
              merged_compression: int = 0, merged_alpha: bool = False) -> bytes:
    """An 8-bit RGB PSD. ``merged`` is (H, W, 3) or (H, W, 4); ``layers`` run bottom → top.

    ``real_merged`` writes resource 1057 with that hasRealMergedData flag (None: no resource);
    ``merged_alpha`` makes the layer count negative (the 4th merged channel is transparency).
    """
    h, w, nch = merged.shape
    out = b"8BPS" + struct.pack(">H6xHIIHH", 1, nch, h, w, 8, 3)
    out += struct.pack(">I", 0)  # colour mode data
    res = b""
    if real_merged is not None:
        # version, hasRealMergedData, writer and reader names (empty), file version
        info = struct.pack(">IBIII", 1, int(real_merged), 0, 0, 1)
        res += b"8BIM" + struct.pack(">H", 1057) + b"\0\0" + struct.pack(">I", len(info)) + info
        res += b"\0" * (len(info) & 1)
    out += struct.pack(">I", len(res)) + res
    if layers:
        records, data = b"", b""
        for lay in layers:
            lh, lw = lay.pixels.shape[:2]
            lengths = []
            for cid, idx in ((-1, 3), (0, 0), (1, 1), (2, 2)) if lh and lw else ():
                chan = _channel(np.ascontiguousarray(lay.pixels[:, :, idx]), lay.compression)
                lengths.append((cid, len(chan)))
                data += chan
            records += _layer_record(lay, lengths)
        count = -len(layers) if merged_alpha else len(layers)
        info = struct.pack(">h", count) + records + data
        info += b"\0" * (len(info) & 1)
        section = struct.pack(">I", len(info)) + info + struct.pack(">I", 0)  # no global mask
        out += struct.pack(">I", len(section)) + section
    else:
        out += struct.pack(">I", 0)
    planes = [np.ascontiguousarray(merged[:, :, c]) for c in range(nch)]
    if merged_compression == 0:
        out += struct.pack(">H", 0) + b"".join(p.tobytes() for p in planes)
    else:  # PackBits: all row counts of all channels first, then all the data
        encoded = [packbits(p) for p in planes]
        counts = [c for cs, _ in encoded for c in cs]
        out += struct.pack(">H", 1) + struct.pack(f">{len(counts)}H", *counts)
        out += b"".join(d for _, d in encoded)
    return out
