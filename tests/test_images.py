"""load_image on awkward files, and the Preprocessor's geometry / normalisation contract."""

from __future__ import annotations

import io
import json
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from showattend.data.images import ImageLoadError, Preprocessor, load_image, to_rgb

RED = (255, 0, 0)
WHITE = (255, 255, 255)


def _close(pixel, expected, tol: int = 30) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, expected))


def _noise_image(w: int = 64, h: int = 48) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


def _assert_load_error(path: Path, *fragments: str) -> ImageLoadError:
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    message = str(info.value)
    assert message.startswith(f"cannot read image {path}: ")
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    return info.value


# --- unreadable inputs ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, suffix", [("JPEG", ".jpg"), ("PNG", ".png")])
def test_truncated_file_raises(tmp_path: Path, fmt: str, suffix: str) -> None:
    buf = io.BytesIO()
    _noise_image().save(buf, format=fmt)
    path = tmp_path / f"truncated{suffix}"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    _assert_load_error(path)


def test_text_file_named_jpg_raises(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image\n")
    _assert_load_error(path)


def test_empty_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.touch()
    _assert_load_error(path, "empty")


def test_directory_raises(tmp_path: Path) -> None:
    path = tmp_path / "folder.jpg"
    path.mkdir()
    _assert_load_error(path, "directory")


def test_missing_path_raises(tmp_path: Path) -> None:
    _assert_load_error(tmp_path / "nope.jpg", "no such file")


def test_error_is_a_value_error(tmp_path: Path) -> None:
    # The CLI reports ValueErrors as user errors; ImageLoadError must be one.
    assert issubclass(ImageLoadError, ValueError)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height 1-bit pixels (the data itself is short)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    idat = zlib.compress(b"\x00" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def test_decompression_bomb_raises_without_decoding(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(_bomb_png(200_000, 200_000))  # 4e10 pixels: decoding would exhaust memory
    assert path.stat().st_size < 200
    _assert_load_error(path, "decompression bomb")


def test_image_over_limit_but_under_pil_error_threshold(tmp_path: Path) -> None:
    # Between MAX_IMAGE_PIXELS and 2x it PIL only warns; load_image must still refuse, quietly.
    side = int((Image.MAX_IMAGE_PIXELS * 1.5) ** 0.5)
    path = tmp_path / "big.png"
    path.write_bytes(_bomb_png(side, side))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _assert_load_error(path, "exceeds the limit")


def test_max_pixels_argument(tmp_path: Path) -> None:
    path = tmp_path / "small.png"
    _noise_image(20, 10).save(path)
    with pytest.raises(ImageLoadError, match="20x10 pixels exceeds"):
        load_image(path, max_pixels=100)
    assert load_image(path, max_pixels=200).size == (20, 10)


def test_pil_global_limit_untouched() -> None:
    # Importing the module must not change PIL's process-wide safety limit.
    assert Image.MAX_IMAGE_PIXELS == int(1024 * 1024 * 1024 // 4 // 3)


# --- unusual but valid images ---------------------------------------------------------------


def test_one_pixel_image_loads(tmp_path: Path) -> None:
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (10, 20, 30)).save(path)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (1, 1)
    assert img.getpixel((0, 0)) == (10, 20, 30)


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 100, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")  # really stored as 16-bit
    out = np.asarray(load_image(path))
    assert out.shape == (1, 4, 3) and out.dtype == np.uint8
    grey = out[0, :, 0]
    assert (out == grey[None, :, None]).all()  # R = G = B
    assert grey[0] == 0 and grey[1] == 100 and grey[3] == 255
    assert abs(int(grey[2]) - 128) <= 1


@pytest.mark.parametrize(
    "values, expected",
    [
        (np.array([[0.0, 0.5, 1.0]], dtype=np.float32), [0, 128, 255]),  # intensities in [0, 1]
        (np.array([[-2.0, 0.0, 2.0]], dtype=np.float32), [0, 128, 255]),  # other range: min-max
    ],
)
def test_float_images_scaled(values: np.ndarray, expected: list[int]) -> None:
    out = np.asarray(to_rgb(Image.fromarray(values)))
    assert np.abs(out[0, :, 1].astype(int) - expected).max() <= 1


def test_cmyk_jpeg_colours(tmp_path: Path) -> None:
    # Left half pure cyan ink (→ cyan), right half magenta + yellow ink (→ red).
    img = Image.new("CMYK", (32, 16), (255, 0, 0, 0))
    img.paste((0, 255, 255, 0), (16, 0, 32, 16))
    path = tmp_path / "cmyk.jpg"
    img.save(path, quality=95)
    with Image.open(path) as raw:
        assert raw.mode == "CMYK"
    out = load_image(path)
    assert out.mode == "RGB"
    assert _close(out.getpixel((4, 8)), (0, 255, 255))
    assert _close(out.getpixel((28, 8)), RED)


def test_palette_png_with_transparency_composited_on_white(tmp_path: Path) -> None:
    img = Image.new("P", (8, 4), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 - 2) * 3)
    img.paste(1, (4, 0, 8, 4))
    path = tmp_path / "palette.png"
    img.save(path, transparency=0)  # index 0 (black) is fully transparent
    out = load_image(path)
    assert out.getpixel((1, 1)) == WHITE
    assert out.getpixel((6, 1)) == RED


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    arr = np.zeros((2, 3, 4), dtype=np.uint8)
    arr[:, 0] = (0, 0, 0, 0)  # transparent black → white
    arr[:, 1] = (255, 0, 0, 255)  # opaque red → red
    arr[:, 2] = (0, 0, 0, 128)  # half-transparent black → mid grey
    path = tmp_path / "rgba.png"
    Image.fromarray(arr).save(path)
    out = load_image(path)
    assert out.getpixel((0, 0)) == WHITE
    assert out.getpixel((1, 0)) == RED
    assert _close(out.getpixel((2, 0)), (127, 127, 127), tol=2)


def test_la_composited_on_white(tmp_path: Path) -> None:
    img = Image.new("LA", (2, 1))
    img.putpixel((0, 0), (0, 0))
    img.putpixel((1, 0), (100, 255))
    path = tmp_path / "la.png"
    img.save(path)
    out = load_image(path)
    assert out.getpixel((0, 0)) == WHITE
    assert out.getpixel((1, 0)) == (100, 100, 100)


def test_one_bit_image(tmp_path: Path) -> None:
    img = Image.new("1", (4, 1), 0)
    img.putpixel((3, 0), 1)
    path = tmp_path / "bits.png"
    img.save(path)
    out = load_image(path)
    assert out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((3, 0)) == WHITE


@pytest.mark.parametrize("fmt, suffix", [("GIF", ".gif"), ("WEBP", ".webp")])
def test_animated_file_gives_first_frame(tmp_path: Path, fmt: str, suffix: str) -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, (0, 0, 255), (0, 255, 0))]
    path = tmp_path / f"anim{suffix}"
    extra = {"lossless": True} if fmt == "WEBP" else {}
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:], duration=50, **extra)
    with Image.open(path) as raw:
        assert getattr(raw, "n_frames", 1) == 3
    out = load_image(path)
    assert out.size == (8, 8)
    assert _close(out.getpixel((4, 4)), RED, tol=5)


def test_exif_orientation_applied(tmp_path: Path) -> None:
    # Stored 40 wide x 20 high with a red block in the top-left corner. Orientation 6 says
    # "rotate 90° clockwise to display": the result is 20 x 40 with the block top-right.
    img = Image.new("RGB", (40, 20), (128, 128, 128))
    img.paste(RED, (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif.tobytes(), quality=95)
    out = load_image(path)
    assert out.size == (20, 40)
    assert _close(out.getpixel((15, 4)), RED)  # top-right
    assert _close(out.getpixel((4, 4)), (128, 128, 128))  # top-left is background now
    assert _close(out.getpixel((15, 35)), (128, 128, 128))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_file_handles_closed(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    _noise_image(8, 8).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(good.read_bytes()[:40])
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        load_image(good)
        with pytest.raises(ImageLoadError):
            load_image(bad)
    assert len(os.listdir("/proc/self/fd")) <= before


# --- Preprocessor -----------------------------------------------------------------------------

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _striped(width: int = 80, height: int = 40) -> Image.Image:
    """Green first quarter, red middle half, blue last quarter (along x)."""
    img = Image.new("RGB", (width, height), RED)
    img.paste((0, 255, 0), (0, 0, width // 4, height))
    img.paste((0, 0, 255), (3 * width // 4, 0, width, height))
    return img


def test_tensor_shape_and_normalisation() -> None:
    pre = Preprocessor(size=(12, 20), mean=MEAN, std=STD)
    colour = (255, 0, 128)
    x = pre.to_tensor(Image.new("RGB", (50, 30), colour))
    assert x.shape == (3, 12, 20) and x.dtype == torch.float32
    for c in range(3):
        expected = (colour[c] / 255 - MEAN[c]) / STD[c]
        assert torch.allclose(x[c], torch.full((12, 20), expected), atol=1e-5)


def test_call_with_path_matches_tensor_of_loaded_image(tmp_path: Path) -> None:
    path = tmp_path / "img.png"
    _noise_image(30, 20).save(path)
    pre = Preprocessor(size=(16, 16), mean=MEAN, std=STD)
    assert torch.equal(pre(path), pre.to_tensor(load_image(path)))
    assert torch.equal(pre(str(path)), pre(Image.open(path)))


def test_stretch_keeps_everything_crop_cuts_sides() -> None:
    img = _striped()
    stretch = Preprocessor(size=(20, 20), mean=MEAN, std=STD, resize="stretch")
    crop = Preprocessor(size=(20, 20), mean=MEAN, std=STD, resize="crop")
    s, c = stretch.geometry(img), crop.geometry(img)
    assert s.size == c.size == (20, 20)
    # Stretch squeezes the whole width in: the green and blue ends survive at the edges.
    assert _close(s.getpixel((0, 10)), (0, 255, 0)) and _close(s.getpixel((19, 10)), (0, 0, 255))
    # Crop keeps the aspect ratio and cuts the outer quarters: only red remains (the outermost
    # columns sit on the former stripe boundary, where bilinear resampling blends a little).
    assert _close(c.getpixel((2, 10)), RED) and _close(c.getpixel((17, 10)), RED)
    crop_pixels = np.asarray(c)
    assert crop_pixels[..., 1].max() < 128 and crop_pixels[..., 2].max() < 128


@pytest.mark.parametrize("resize", ["stretch", "crop"])
def test_non_square_target(resize: str) -> None:
    pre = Preprocessor(size=(10, 30), mean=MEAN, std=STD, resize=resize)
    for w, h in [(40, 40), (7, 100), (100, 7), (1, 1)]:
        assert pre.geometry(Image.new("RGB", (w, h))).size == (30, 10)
        assert pre.to_tensor(Image.new("RGB", (w, h))).shape == (3, 10, 30)


def test_geometry_is_identity_at_target_size() -> None:
    img = _noise_image(24, 16)
    for resize in ("stretch", "crop"):
        pre = Preprocessor(size=(16, 24), mean=MEAN, std=STD, resize=resize)
        assert np.array_equal(np.asarray(pre.geometry(img)), np.asarray(img))


def test_geometry_converts_non_rgb_images() -> None:
    pre = Preprocessor(size=(4, 4), mean=MEAN, std=STD)
    out = pre.geometry(Image.new("RGBA", (4, 4), (0, 0, 0, 0)))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == WHITE


def test_view_is_uint8_geometry(tmp_path: Path) -> None:
    img = _striped(37, 23)
    pre = Preprocessor(size=(16, 12), mean=MEAN, std=STD, resize="crop")
    view = pre.view(img)
    assert view.dtype == np.uint8 and view.shape == (16, 12, 3)
    assert np.array_equal(view, np.asarray(pre.geometry(img)))
    path = tmp_path / "striped.png"
    img.save(path)
    assert np.array_equal(pre.view(path), view)


def test_dict_round_trip_through_json() -> None:
    pre = Preprocessor(size=(14, 18), mean=MEAN, std=STD, resize="crop")
    d = json.loads(json.dumps(pre.to_dict()))  # lists, as they come back from a checkpoint
    again = Preprocessor.from_dict(d)
    assert again == pre and hash(again) == hash(pre)
    assert isinstance(again.size, tuple) and again.to_dict() == pre.to_dict()


@pytest.mark.parametrize(
    "bad",
    [
        {"size": [8, 8], "mean": [0, 0, 0]},  # missing std
        {"size": [8, 8], "mean": [0, 0, 0], "std": [1, 1, 1], "colour": "rgb"},  # unknown key
        {"size": [8], "mean": [0, 0, 0], "std": [1, 1, 1]},
        {"size": [8, 8], "mean": [0, 0, 0], "std": [1, 0, 1]},
        {"size": [8, 8], "mean": [0, 0, 0], "std": [1, 1, 1], "resize": "pad"},
        {"size": 8, "mean": [0, 0, 0], "std": [1, 1, 1]},
        ["size", "mean", "std"],
    ],
)
def test_from_dict_rejects_bad_descriptions(bad: object) -> None:
    with pytest.raises(ValueError):
        Preprocessor.from_dict(bad)  # type: ignore[arg-type]
