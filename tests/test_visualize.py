"""Attention upsampling alignment, overlay figures and training-curve plots."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from showattend.visualize import (
    _curve_panels,
    attention_figure,
    plot_curves,
    save_attention_figure,
    upsample_attention,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]


def _one_hot(grid: tuple[int, int], cell: tuple[int, int]) -> np.ndarray:
    alpha = np.zeros(grid)
    alpha[cell] = 1.0
    return alpha


# ---------------------------------------------------------------------------- upsampling


def test_upsample_one_hot_cell_maps_to_its_pixel_rectangle() -> None:
    # Image 48 x 80 (H x W), grid 3 x 5: cells are 16 x 16 and cell (1, 3) is rows 16..31,
    # cols 48..63. Any H/W or i/j mix-up moves or reshapes the rectangle.
    alpha = _one_hot((3, 5), (1, 3))
    expected = np.zeros((48, 80))
    expected[16:32, 48:64] = 1.0

    sharp = upsample_attention(alpha, (48, 80), smooth=False)
    assert sharp.shape == (48, 80)
    np.testing.assert_array_equal(sharp, expected)

    smooth = upsample_attention(alpha, (48, 80), smooth=True)
    assert smooth.shape == (48, 80)
    assert smooth.min() >= 0.0 and smooth.max() == pytest.approx(1.0)
    r, c = np.unravel_index(np.argmax(smooth), smooth.shape)
    assert 16 <= r < 32 and 48 <= c < 64
    # Symmetric blur: the heat's centre of mass is the rectangle's centre (24, 56) in pixel
    # coordinates, where pixel r spans [r, r + 1).
    rows, cols = np.indices(smooth.shape) + 0.5
    mass = smooth.sum()
    assert (rows * smooth).sum() / mass == pytest.approx(24.0, abs=0.5)
    assert (cols * smooth).sum() / mass == pytest.approx(56.0, abs=0.5)
    # Smoothing spreads heat beyond the cell, but not across the image.
    assert smooth[20, 44] > 0.1 and smooth[0, 0] < 1e-3


def test_upsample_when_cells_do_not_divide_the_image() -> None:
    # H = 10, h = 3: boundaries at 3.33 and 6.67, so pixel centres 3.5 .. 6.5 are in cell 1.
    sharp = upsample_attention(_one_hot((3, 1), (1, 0)), (10, 7), smooth=False)
    np.testing.assert_array_equal(sharp[:, 0], [0, 0, 0, 1, 1, 1, 1, 0, 0, 0])
    assert (sharp == sharp[:, :1]).all()  # one column of cells spans the whole width


def test_upsample_normalisation() -> None:
    # A uniform map is "attends everywhere": full heat, not a blank.
    np.testing.assert_allclose(upsample_attention(np.full((4, 4), 1 / 16), (8, 8)),
                               np.ones((8, 8)), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(upsample_attention(np.zeros((2, 3)), (4, 6)), np.zeros((4, 6)))
    up = upsample_attention(np.random.default_rng(0).random((7, 3)), (50, 33))
    assert up.shape == (50, 33) and up.min() >= 0 and up.max() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="2-D"):
        upsample_attention(np.ones((2, 2, 2)), (4, 4))


# ---------------------------------------------------------------------------- figures


def _scene() -> tuple[np.ndarray, list[str], np.ndarray]:
    image = np.full((48, 80, 3), 100, np.uint8)
    image[16:32, 48:64] = (220, 30, 30)  # a red square in cell (1, 3)
    words = ["a", "red", "square", "for", "$5"]
    alphas = np.stack([np.full((3, 5), 1 / 15)] + [_one_hot((3, 5), (1, 3))] * 4)
    return image, words, alphas


def _image_axes(fig) -> list:
    return [ax for ax in fig.axes if ax.images]


def test_attention_figure_panels_and_titles() -> None:
    from matplotlib.figure import Figure

    image, words, alphas = _scene()
    betas = np.array([0.1, 0.83, 0.5, 0.25, 1.0])
    fig = attention_figure(image, words, alphas, betas=betas, title="run 7", cols=3)
    assert isinstance(fig, Figure)
    axes = _image_axes(fig)
    assert len(axes) == len(words) + 1
    assert axes[0].get_title().replace("\n", " ") == "a red square for \\$5"
    titles = [ax.get_title() for ax in axes[1:]]
    assert titles[1] == "red (β=0.83)"
    for word, title, beta in zip(words, titles, betas):
        assert word.replace("$", "\\$") in title and f"β={beta:.2f}" in title
    assert fig.get_suptitle() == "run 7"
    fig.canvas.draw()  # "$5" must not be parsed as mathtext

    plain = attention_figure(image, words, alphas)
    assert [ax.get_title() for ax in _image_axes(plain)[1:]][:3] == ["a", "red", "square"]


def test_attention_figure_draws_hard_attention_boxes() -> None:
    from matplotlib.patches import Rectangle

    image, words, alphas = _scene()
    boxes = [None, (48, 16, 64, 32), None, None, None]
    fig = attention_figure(image, words, alphas, boxes=boxes)
    axes = _image_axes(fig)
    rects = [p for p in axes[2].patches if isinstance(p, Rectangle)]
    assert rects, "no rectangle drawn for the word with a box"
    assert all(p.get_xy() == (48.0, 16.0) and p.get_width() == 16 and p.get_height() == 16
               for p in rects)
    assert not [p for ax in axes[3:] for p in ax.patches]


def test_attention_figure_overlay_is_aligned_with_the_image() -> None:
    # The heat layer shares the image's pixel extent, so its hottest pixel is on the square.
    image, words, alphas = _scene()
    fig = attention_figure(image, words, alphas)
    heat_layer = _image_axes(fig)[2].images[1]
    assert heat_layer.get_extent() == _image_axes(fig)[2].images[0].get_extent()
    heat = np.asarray(heat_layer.get_array())
    r, c = np.unravel_index(np.argmax(heat), heat.shape)
    assert 16 <= r < 32 and 48 <= c < 64


def test_attention_figure_rejects_mismatched_inputs() -> None:
    image, words, alphas = _scene()
    with pytest.raises(ValueError, match="does not match 4 words"):
        attention_figure(image, words[:4], alphas)
    with pytest.raises(ValueError, match="betas"):
        attention_figure(image, words, alphas, betas=np.ones(3))
    with pytest.raises(ValueError, match="boxes"):
        attention_figure(image, words, alphas, boxes=[None])


def test_save_attention_figure_writes_a_png(tmp_path: Path) -> None:
    image, words, alphas = _scene()
    fig = attention_figure(image, words, alphas, cols=3)
    path = tmp_path / "out" / "overlay.png"
    save_attention_figure(fig, path)
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as png:
        png.verify()
    with Image.open(path) as png:
        width, height = png.size
    assert width > 300 and height > 200  # 3 panels per row, 2 rows
    assert not fig.axes  # closed: nothing left to draw
    assert [p.name for p in path.parent.iterdir()] == ["overlay.png"]


def test_library_never_imports_pyplot(tmp_path: Path) -> None:
    code = (
        "import sys, numpy as np\n"
        "from showattend.visualize import attention_figure, save_attention_figure, plot_curves\n"
        "fig = attention_figure(np.zeros((8, 8, 3), np.uint8), ['a'], np.ones((1, 2, 2)))\n"
        f"save_attention_figure(fig, {str(tmp_path / 'a.png')!r})\n"
        f"plot_curves([{{'step': 1, 'loss': 2.0}}], {str(tmp_path / 'b.png')!r})\n"
        "print('matplotlib.pyplot' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, env={"PYTHONPATH": str(REPO), "MPLBACKEND": "",
                                        "PATH": "/usr/bin:/bin"}, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------- curves


RECORDS = (
    [{"step": s, "epoch": s // 100, "loss": 3.0 / (1 + s), "lr": 1e-3} for s in range(0, 300, 10)]
    + [{"epoch": e, "step": 100 * e + 99, "val_loss": 1.0 / (e + 1), "BLEU-4": 0.2 * e,
        "CIDEr": 0.5 * e} for e in range(3)]
)


def test_curve_panels_put_losses_on_steps_and_metrics_on_epochs() -> None:
    panels = {key: (axis, xs, ys) for key, axis, xs, ys in _curve_panels(RECORDS, None)}
    assert list(panels) == ["loss", "lr", "val_loss", "BLEU-4", "CIDEr"]
    assert panels["loss"][0] == "step" and len(panels["loss"][1]) == 30
    assert panels["BLEU-4"] == ("epoch", [0.0, 1.0, 2.0], [0.0, 0.2, 0.4])
    assert panels["val_loss"][0] == "step"
    # Without steps a loss falls back to epochs.
    assert _curve_panels([{"epoch": 1, "loss": 1.0}], None)[0][1] == "epoch"


def test_plot_curves_writes_png(tmp_path: Path) -> None:
    path = tmp_path / "curves.png"
    plot_curves(RECORDS, path, keys=["loss", "BLEU-4", "CIDEr", "val_loss"])
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as png:
        assert png.size == (1200, 600)  # 3 panels per row at 4 x 3 inches, 100 dpi; 2 rows
    with pytest.raises(ValueError, match="no record has a numeric 'METEOR'"):
        plot_curves(RECORDS, tmp_path / "x.png", keys=["METEOR"])
    with pytest.raises(ValueError, match="no numeric values"):
        plot_curves([{"step": 1}], tmp_path / "y.png")
    assert not (tmp_path / "x.png").exists()
