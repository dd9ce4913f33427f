"""load_image reads every format Pillow reads, with the pixels the file shows: PSD (flat, layered,
without a merged image), SPIDER, multi-page TIFF, and a round trip through every writable format;
decoder warnings become at most one log line per file."""

from __future__ import annotations

import io
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from psd_writer import Layer, group, group_end, packbits, psd_bytes
from showattend.api import iter_image_paths
from showattend.data.images import image_extensions, load_image

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def _blocks(size: int = 64, cells: int = 4) -> np.ndarray:
    """(size, size, 3) uint8: cells × cells flat blocks of distinct colours (16 colours for 4)."""
    rng = np.random.default_rng(3)
    colours = rng.integers(0, 256, size=(cells, cells, 3), dtype=np.uint8)
    return np.kron(colours, np.ones((size // cells, size // cells, 1), np.uint8))


def _rgba(h: int, w: int, colour: tuple[int, int, int], alpha: int = 255) -> np.ndarray:
    return np.broadcast_to(np.array([*colour, alpha], np.uint8), (h, w, 4)).copy()


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# --- PSD ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", [0, 1])
def test_flat_psd(tmp_path: Path, compression: int) -> None:
    src = _blocks(32)
    path = _write(tmp_path, "flat.psd", psd_bytes(src, merged_compression=compression))
    assert np.array_equal(np.asarray(load_image(path)), src)


def test_layered_psd_gives_its_merged_image(tmp_path: Path) -> None:
    # This used to fail with "attempt to seek outside sequence": PSD layers are frames 1..n.
    merged = _blocks(32)
    layers = [Layer(_rgba(32, 32, RED)), Layer(_rgba(8, 8, BLUE), top=4, left=4)]
    path = _write(tmp_path, "layered.psd", psd_bytes(merged, layers, real_merged=True))
    with Image.open(path) as raw:
        assert raw.n_frames == 2  # really layered
    # the merged image (not a layer, nor their composite) is the picture
    assert np.array_equal(np.asarray(load_image(path)), merged)


def test_psd_without_merged_image_composites_its_layers(tmp_path: Path) -> None:
    # Photoshop without "Maximize Compatibility" writes a white merged image and says so.
    h, w = 12, 16
    bottom = _rgba(h, w, RED)
    bottom[:, 8:, :3] = GREEN  # left half red, right half green
    half_blue = _rgba(4, 4, BLUE, alpha=128)  # 50% transparent blue square
    layers = [
        Layer(bottom, compression=1),
        Layer(half_blue, top=2, left=2, compression=2),
        Layer(_rgba(4, 4, BLUE), top=2, left=10, opacity=128, compression=3),  # opacity 50%
        Layer(_rgba(h, w, (0, 0, 0)), visible=False),  # a hidden black layer covers nothing
        group_end(),
        Layer(_rgba(h, w, (0, 0, 0))),  # visible itself, but inside a hidden group
        group("hidden group", visible=False),
        Layer(_rgba(3, 3, BLUE), top=-1, left=14),  # partly outside the canvas (clipped)
    ]
    path = _write(tmp_path, "no_merged.psd",
                  psd_bytes(np.full((h, w, 3), 255, np.uint8), layers, real_merged=False))
    out = np.asarray(load_image(path)).astype(int)
    assert tuple(out[0, 0]) == RED and tuple(out[11, 15]) == GREEN  # black layers not drawn
    assert np.abs(out[3, 3] - (127, 0, 128)).max() <= 1  # red under 50% blue
    assert np.abs(out[3, 11] - (0, 127, 128)).max() <= 1  # green under blue at opacity 128
    assert tuple(out[0, 15]) == BLUE and tuple(out[1, 14]) == BLUE  # the clipped layer
    assert tuple(out[2, 14]) == GREEN  # just below it


def test_psd_layers_composite_on_white_where_transparent(tmp_path: Path) -> None:
    layers = [Layer(_rgba(4, 4, RED), top=0, left=0)]
    path = _write(tmp_path, "sparse.psd",
                  psd_bytes(np.zeros((8, 8, 3), np.uint8), layers, real_merged=False))
    out = np.asarray(load_image(path))
    assert tuple(out[1, 1]) == RED and tuple(out[6, 6]) == WHITE


def test_psd_blend_mode_approximation_is_one_warning(tmp_path: Path, caplog) -> None:
    layers = [Layer(_rgba(4, 4, RED)), Layer(_rgba(4, 4, BLUE), blend=b"mul ")]
    path = _write(tmp_path, "multiply.psd",
                  psd_bytes(np.full((4, 4, 3), 255, np.uint8), layers, real_merged=False))
    with caplog.at_level(logging.WARNING, logger="showattend.data.images"):
        out = np.asarray(load_image(path))
    assert tuple(out[0, 0]) == BLUE  # drawn with normal blending
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "without blend modes" in lines[0] and str(path) in lines[0]


@pytest.mark.parametrize("merged_alpha", [False, True])
def test_psd_fourth_channel(tmp_path: Path, merged_alpha: bool) -> None:
    # A 4th merged channel is transparency only with a negative layer count; otherwise it is a
    # saved selection and must not whiten the picture.
    merged = _rgba(4, 4, RED, alpha=0)
    layers = [Layer(_rgba(4, 4, RED, alpha=0))]
    path = _write(tmp_path, "alpha.psd", psd_bytes(merged, layers, merged_alpha=merged_alpha))
    assert tuple(np.asarray(load_image(path))[0, 0]) == (WHITE if merged_alpha else RED)


def test_packbits_writer_round_trips_through_pillow() -> None:
    # the fixture's encoder must be real PackBits, or the PSD tests would prove nothing
    rows = np.array([[1, 1, 1, 1, 2, 3, 4, 4, 4, 5] * 30, [i % 256 for i in range(300)]],
                    dtype=np.uint8)
    counts, data = packbits(rows)
    assert sum(counts) == len(data) < rows.size + 20
    decoded = Image.frombytes("L", (300, 2), data, "packbits", "L")
    assert np.array_equal(np.asarray(decoded), rows)


@pytest.mark.parametrize("real_merged", [True, False])
def test_truncated_psd_is_a_load_error(tmp_path: Path, real_merged: bool) -> None:
    # cut inside the merged image (read when real) / inside the layers (read when not)
    data = psd_bytes(_blocks(16), [Layer(_rgba(16, 16, RED))], real_merged=real_merged)
    path = _write(tmp_path, "cut.psd", data[: len(data) - (300 if real_merged else 1100)])
    with pytest.raises(ValueError, match=r"cannot read image .*cut\.psd"):
        load_image(path)


# --- SPIDER, multi-page TIFF --------------------------------------------------------------------


def test_spider(tmp_path: Path) -> None:
    # This used to fail: a single SPIDER image refuses any seek, even to frame 0.
    grey = _blocks(32)[:, :, 0]
    path = tmp_path / "image.spi"
    Image.fromarray(grey).save(path, format="SPIDER")
    out = np.asarray(load_image(path))
    assert np.array_equal(out, np.repeat(grey[:, :, None], 3, axis=2))  # 8-bit samples as floats


def test_spider_with_float_densities_is_stretched(tmp_path: Path) -> None:
    values = np.linspace(-3.5, 7.25, 16, dtype=np.float32).reshape(4, 4)
    path = tmp_path / "density.spi"
    Image.fromarray(values).save(path, format="SPIDER")
    grey = np.asarray(load_image(path))[:, :, 0].astype(int)
    assert grey.min() == 0 and grey.max() == 255
    assert (np.diff(grey.ravel()) > 0).all()  # order kept


def test_multipage_tiff_gives_first_page(tmp_path: Path) -> None:
    pages = [Image.new("RGB", (8, 8), c) for c in (RED, GREEN, BLUE)]
    path = tmp_path / "pages.tif"
    pages[0].save(path, save_all=True, append_images=pages[1:])
    with Image.open(path) as raw:
        assert raw.n_frames == 3
    assert load_image(path).getpixel((4, 4)) == RED


# --- every format Pillow writes -----------------------------------------------------------------

# format → (file suffix, save options, mode written, side, tolerance). Lossless formats
# (tolerance 0) must give the source back exactly; lossy ones must keep every block's interior
# within the tolerance (edges ring under chroma subsampling) and the whole image close on average.
ROUND_TRIP = {
    "AVIF": (".avif", {"quality": 90}, "RGB", 64, 12),
    "BLP": (".blp", {}, "P", 64, 0),  # a palette format: the 16 colours fit exactly
    "BMP": (".bmp", {}, "RGB", 64, 0),
    "DDS": (".dds", {}, "RGB", 64, 0),
    "DIB": (".dib", {}, "RGB", 64, 0),
    "GIF": (".gif", {}, "P", 64, 0),
    "ICNS": (".icns", {}, "RGB", 1024, 0),  # Pillow writes every icon size up to 1024
    "ICO": (".ico", {}, "RGB", 64, 0),
    "IM": (".im", {}, "RGB", 64, 0),
    "JPEG": (".jpg", {"quality": 95}, "RGB", 64, 12),
    "JPEG2000": (".jp2", {}, "RGB", 64, 0),  # lossless by default
    "MSP": (".msp", {}, "1", 64, 0),
    "PCX": (".pcx", {}, "RGB", 64, 0),
    "PNG": (".png", {}, "RGB", 64, 0),
    "PPM": (".ppm", {}, "RGB", 64, 0),
    "QOI": (".qoi", {}, "RGB", 64, 0),
    "SGI": (".sgi", {}, "RGB", 64, 0),
    "SPIDER": (".spi", {}, "L", 64, 0),
    "TGA": (".tga", {}, "RGB", 64, 0),
    "TIFF": (".tif", {}, "RGB", 64, 0),
    "WEBP": (".webp", {"quality": 90}, "RGB", 64, 12),
    "XBM": (".xbm", {}, "1", 64, 0),
}
# Writable and readable, but not decodable here without outside software or a handler.
NOT_ROUND_TRIPPED = {"EPS": "needs Ghostscript", "PDF": "Pillow writes PDF but does not read it",
                     "BUFR": "stub", "GRIB": "stub", "HDF5": "stub", "WMF": "stub (Windows only)",
                     "PALM": "write only", "MPO": "multi-picture JPEG: covered by JPEG"}


def test_round_trip_list_covers_every_writable_format() -> None:
    Image.init()
    writable = set(Image.SAVE)
    assert writable <= set(ROUND_TRIP) | set(NOT_ROUND_TRIPPED), writable - set(ROUND_TRIP)


@pytest.mark.parametrize("fmt", sorted(ROUND_TRIP))
def test_round_trip_through_format(tmp_path: Path, fmt: str) -> None:
    suffix, options, mode, side, tol = ROUND_TRIP[fmt]
    Image.init()
    if fmt not in Image.SAVE:
        pytest.skip(f"this Pillow cannot write {fmt}")
    src = Image.fromarray(_blocks(side))
    src = src.quantize(16) if mode == "P" else src.convert(mode)
    path = tmp_path / f"image{suffix}"
    src.save(path, format=fmt, **options)
    out = np.asarray(load_image(path)).astype(int)
    want = np.asarray(src.convert("RGB")).astype(int)
    assert out.shape == want.shape == (side, side, 3)
    err = np.abs(out - want)  # (side, side, 3)
    if tol == 0:
        assert err.max() == 0, (fmt, err.mean(), err.max())
        return
    cell, margin = side // 4, side // 16
    interior = np.zeros((side, side), bool)
    for i in range(4):
        for j in range(4):
            interior[i * cell + margin:(i + 1) * cell - margin,
                     j * cell + margin:(j + 1) * cell - margin] = True
    assert err[interior].max() <= tol and err.mean() <= tol / 2, (fmt, err[interior].max(),
                                                                  err.mean())


def test_folder_scan_finds_every_readable_format(tmp_path: Path) -> None:
    for name in ("a.psd", "b.spi", "c.qoi", "d.tga", "e.pcx", "f.ico", "notes.txt", "doc.pdf"):
        (tmp_path / name).write_bytes(b"x")
    found = {p.name for p in iter_image_paths([tmp_path])}
    assert found == {"a.psd", "b.spi", "c.qoi", "d.tga", "e.pcx", "f.ico"}
    assert {".jpg", ".png", ".psd", ".webp", ".tif"} <= image_extensions()


# --- warnings: one line per file ----------------------------------------------------------------


def _tiff_with_bad_tags(w: int = 4, h: int = 2) -> bytes:
    """A valid uncompressed RGB TIFF whose extra tags make Pillow warn several times."""
    pixels = bytes((x * 60) % 256 for x in range(w * h * 3))
    entries = []

    def entry(tag: int, typ: int, count: int, value: bytes) -> None:
        entries.append(struct.pack("<HHI", tag, typ, count) + value)

    n = 12
    bps_at = 8 + 2 + n * 12 + 4
    data_at = bps_at + 6
    entry(256, 3, 1, struct.pack("<HH", w, 0))
    entry(257, 3, 1, struct.pack("<HH", h, 0))
    entry(258, 3, 3, struct.pack("<I", bps_at))
    entry(259, 3, 1, struct.pack("<HH", 1, 0))
    entry(262, 3, 1, struct.pack("<HH", 2, 0))
    entry(273, 4, 1, struct.pack("<I", data_at))
    entry(274, 3, 2, struct.pack("<HH", 1, 1))  # Orientation with two values: "too many entries"
    entry(277, 3, 1, struct.pack("<HH", 3, 0))
    entry(278, 3, 1, struct.pack("<HH", h, 0))
    entry(279, 4, 1, struct.pack("<I", len(pixels)))
    entry(296, 3, 2, struct.pack("<HH", 2, 2))  # ResolutionUnit with two values
    entry(65000, 7, 100_000, struct.pack("<I", 8))  # a private tag claiming more than the file
    ifd = struct.pack("<H", n) + b"".join(entries) + struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<HHH", 8, 8, 8) + pixels


def _jpeg_with_corrupt_exif() -> bytes:
    ifd_entries = b"".join(struct.pack(">HHII", 0x010E + k, 2, 40, 0x200 + k) for k in range(3))
    exif = (b"Exif\x00\x00MM\x00\x2a" + struct.pack(">I", 8) + struct.pack(">H", 3)
            + ifd_entries + struct.pack(">I", 0))
    buf = io.BytesIO()
    Image.new("RGB", (16, 8), (90, 120, 150)).save(buf, format="JPEG", exif=exif, quality=95)
    return buf.getvalue()


def test_bad_tiff_tags_give_one_line(tmp_path: Path, caplog, capfd) -> None:
    path = _write(tmp_path, "tags.tif", _tiff_with_bad_tags())
    with caplog.at_level(logging.WARNING):
        img = load_image(path)
    assert np.asarray(img)[0, 1].tolist() == [180, 240, 44]  # the pixels are intact
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    assert str(path) in lines[0] and "more)" in lines[0]  # several warnings, one line
    out, err = capfd.readouterr()  # nothing reached the process's real stdout / stderr
    assert out == "" and err == ""


def test_corrupt_exif_gives_one_line_without_handlers(tmp_path: Path) -> None:
    """Through logging's last-resort handler (an API user with no logging set up): one line."""
    import subprocess
    import sys

    path = _write(tmp_path, "exif.jpg", _jpeg_with_corrupt_exif())
    code = ("import sys; from showattend.data.images import load_image\n"
            "for _ in range(3): load_image(sys.argv[1])\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 3 and all(str(path) in line for line in lines), lines  # one per load


def test_clean_file_logs_nothing(tmp_path: Path, caplog) -> None:
    path = tmp_path / "clean.png"
    Image.fromarray(_blocks(16)).save(path)
    with caplog.at_level(logging.DEBUG, logger="showattend.data.images"):
        load_image(path)
    assert not caplog.records


def test_zlib_is_used_by_the_fixture() -> None:
    # ZIP-compressed layers in the PSD tests must really be compressed
    layer = Layer(_rgba(16, 16, RED), compression=2)
    data = psd_bytes(np.zeros((16, 16, 3), np.uint8), [layer], real_merged=False)
    assert zlib.compress(np.full((16, 16), 255, np.uint8).tobytes()) in data


def test_c_level_decoder_output_is_captured_per_file(tmp_path: Path, trained) -> None:
    """What a C decoder writes straight to fd 2 (libtiff's tag warnings) becomes part of the
    file's one log line, not raw lines on stderr; `caption` on a folder shows none of it."""
    import subprocess
    import sys

    path = tmp_path / "noisy.png"
    Image.fromarray(_blocks(16)).save(path)
    code = ("import os, sys\nimport showattend.data.images as I\nreal = I._decode\n"
            "def noisy(p, limit):\n"
            "    for i in range(50): os.write(2, b'TIFFReadDirectory: Warning, Unknown field\\n')\n"
            "    return real(p, limit)\n"
            "I._decode = noisy\n"
            "if sys.argv[3] == 'api':\n"
            "    for _ in range(2): I.load_image(sys.argv[1])\n"
            "    sys.exit(0)\n"
            "from showattend.cli import main\n"
            "sys.exit(main(['-q', 'caption', sys.argv[1], sys.argv[1], '--workers', '0',\n"
            "               '--checkpoint', sys.argv[2]]))\n")
    ck = str(trained[1])
    api = subprocess.run([sys.executable, "-c", code, str(path), ck, "api"],
                         capture_output=True, text=True, timeout=120)
    lines = api.stderr.splitlines()
    # two load_image calls: one line each, naming the file (the API's logging, as before)
    assert sum(str(path) in ln and "Unknown field" in ln for ln in lines) == 2, lines
    assert not any(ln.startswith("TIFFReadDirectory") for ln in lines), lines
    cli = subprocess.run([sys.executable, "-c", code, str(path), ck, "cli"],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0 and cli.stderr == "", cli.stderr  # a readable file: silence
    assert cli.stdout.count(str(path)) == 2
