"""Generated Flickr8k-format and COCO-format fixtures with real JPEG files (tests of prepare)."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220)}
SHAPES = ("circle", "square")


def draw(path: Path, colour: str, shape: str, size: tuple[int, int] = (48, 40)) -> None:
    """A JPEG photo-like file: one coloured shape on a grey background."""
    w, h = size
    img = Image.new("RGB", size, (200, 200, 190))
    d = ImageDraw.Draw(img)
    box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
    (d.ellipse if shape == "circle" else d.rectangle)(box, fill=COLOURS[colour])
    img.save(path, "JPEG", quality=90)


def bomb(path: Path, side: int = 30_000) -> None:
    """A PNG whose header claims side x side pixels (a decompression bomb); no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I",
                                                                         zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"")
                     + chunk(b"IEND", b""))


def captions_for(colour: str, shape: str) -> list[str]:
    return [f"A {colour} {shape} .", f"a {colour} {shape} on grey", f"The {shape} is {colour} .",
            f"one {colour} {shape}", f"A {shape} , {colour} ."]


def _scenes(n: int) -> list[tuple[str, str, str]]:
    names = []
    for i in range(n):
        colour = list(COLOURS)[i % 3]
        shape = SHAPES[(i // 3) % 2]
        names.append((f"{1000 + i}_{i:04x}abcd.jpg", colour, shape))
    return names


def make_flickr(root: Path, n: int = 14) -> dict[str, Path]:
    """Flickr8k layout: images/, Flickr8k.token.txt (CRLF), Flickr_8k.{train,dev,test}Images.txt.

    Of the listed images: #2 (train) is missing, #5 (train) is a corrupt JPEG, #9 (val) is 8x8
    pixels (too small), #13 (test) is a decompression bomb; the token file carries the official
    bad entry style ``x.jpg.1``.
    """
    images = root / "images"
    images.mkdir(parents=True)
    scenes = _scenes(n)
    lines = []
    for i, (name, colour, shape) in enumerate(scenes):
        if i == 2:
            pass  # missing
        elif i == 5:
            (images / name).write_bytes(b"\xff\xd8\xff\xe0" + b"not really a jpeg" * 20)
        elif i == 9:
            draw(images / name, colour, shape, size=(8, 8))
        elif i == 13:
            bomb(images / name)
        else:
            draw(images / name, colour, shape, size=(48 + 4 * i, 40 + (i % 3) * 8))
        caps = captions_for(colour, shape)
        if i == 5:  # a word seen only with an unusable image: it must not reach the vocabulary
            caps[0] += " zebra"
        if i >= 11:  # a word seen only in the test split: it must not reach the vocabulary
            caps[1] += " near a tree"
        lines += [f"{name}#{k}\t{c}" for k, c in enumerate(caps)]
    lines.insert(7, "2258277193_586949ec62.jpg.1#0\tpeople waiting for the subway")
    token = root / "Flickr8k.token.txt"
    token.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    split_dir = root / "text"
    split_dir.mkdir()
    names = [s[0] for s in scenes]
    train, val, test = names[:8], names[8:11], names[11:]
    (split_dir / "Flickr_8k.trainImages.txt").write_bytes(("\r\n".join(train) + "\r\n").encode())
    (split_dir / "Flickr_8k.devImages.txt").write_text("\n".join(val) + "\n")
    (split_dir / "Flickr_8k.testImages.txt").write_text("\n".join(test) + "\n")
    return {"images": images, "token": token, "splits": split_dir}


def make_coco(root: Path, n: int = 12) -> dict[str, Path]:
    """COCO layout: images/ and captions_{train,val,test}.json; image 1 (train) is missing and
    image 4 (train) is a truncated JPEG."""
    images = root / "images"
    images.mkdir(parents=True)
    scenes = _scenes(n)
    parts = {"train": range(0, 7), "val": range(7, 9), "test": range(9, n)}
    files = {}
    for split, idx in parts.items():
        imgs, anns = [], []
        for i in idx:
            name, colour, shape = scenes[i]
            if i == 4:
                draw(images / name, colour, shape)
                data = (images / name).read_bytes()
                (images / name).write_bytes(data[: len(data) // 3])
            elif i != 1:
                draw(images / name, colour, shape)
            imgs.append({"id": 500 + i, "file_name": name})
            anns += [{"id": 10 * i + k, "image_id": 500 + i, "caption": c}
                     for k, c in enumerate(captions_for(colour, shape))]
        files[split] = root / f"captions_{split}.json"
        files[split].write_text(json.dumps({"images": imgs, "annotations": anns}))
    return {"images": images, **files}


TINY_PREPARED = """
name = "tiny_prepared"
out_dir = "{out}"
[data]
kind = "flickr"
root = "{images}"
flickr_captions = "{token}"
flickr_splits = "{splits}"
prepared = "{prepared}"
min_image_side = 16
[encoder]
backbone = "{backbone}"
weights = "none"
grid = {grid}
image_size = 32
channels = 16
coords = {coords}
[attention]
dim = 16
[decoder]
embed_dim = 16
hidden_dim = 32
dropout = 0.0
[train]
epochs = 1
batch_size = 8
val_beam = 1
log_every = 1
threads = 1
[eval]
beam = 2
meteor = false
batch_size = 8
"""


def prepared_toml(path: Path, fx: dict[str, Path], prepared: Path, out: Path,
                  backbone: str = "shapes_cnn", grid: int = 4, coords: bool = True) -> Path:
    """A tiny run config reading the Flickr fixture ``fx`` through the prepared folder."""
    path.write_text(TINY_PREPARED.format(
        out=out, images=fx["images"], token=fx["token"], splits=fx["splits"], prepared=prepared,
        backbone=backbone, grid=grid, coords=str(coords).lower()))
    return path
