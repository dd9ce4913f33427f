"""Glimpses on pixels: at every word the decoder looks at a small window of the *image*.

The annotation grid still proposes where to look (α = softmax of the score function, exactly as in
soft/hard attention: the coarse CNN features are the "context network" of Ba et al.'s DRAM), but
the context z_t is not an annotation: it is a fixed-size glimpse of the image's pixels, encoded by
a small glimpse network (:class:`GlimpseNet`, "what" from the pixels + "where" from the window).

* ``glimpse_hard``: s ~ Cat(α); g = I[y:y+G, x:x+G], the G×G crop centred on cell s. Not
  differentiable in s: trained with the landed REINFORCE estimator (it *is* HardAttention with the
  crops replaced by glimpse encodings, so sampling, mixing, test modes and the losses are shared).
* ``glimpse_gaussian``: DRAW's read (Gregor et al., 2015): separable Gaussian filterbanks
  F_Y (N×H), F_X (N×W) centred at E_α[cell centre], stride δ and width σ from h_{t−1};
  g = F_Y I F_Xᵀ. Differentiable in centre, stride and width.
* ``glimpse_stn``: a spatial transformer (Jaderberg et al., 2015): θ = [A | t], t = E_α[cell
  centre], A = (G/W)(I + R h_{t−1}); g = grid_sample(I, affine_grid(θ)). Differentiable.

For the soft kinds the reported map is the glimpse's footprint on the grid (how much of each cell
it reads), so grounding measures where the model actually looked; the window box goes to the
overlays as ``aux["window"]``.

The pixels reach the attention through the annotations: :func:`pack_pixels` appends each cell's
pixels to its annotation vector (a lossless space-to-depth), so decoding, beam search and the
training paths carry them without knowing about images. A feature cache has no pixels: training
glimpses from one is refused (data/prepared.py).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
import torch.nn.functional as F

from showattend.models.attention import AttentionOutput, HardAttention, Memory, _entropy


# --- pixels carried with the annotations -----------------------------------------------------

def pack_pixels(images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """images (B, C, H, W) → (B, L, C·ph·pw): cell i's pixels, row-major like the annotations."""
    b, c, h, w = images.shape
    gh, gw = grid
    if h % gh or w % gw:
        raise ValueError(f"glimpse attention needs the image ({h}×{w}) divisible by the grid "
                         f"({gh}×{gw})")
    ph, pw = h // gh, w // gw
    x = images.reshape(b, c, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5)  # (B, gh, gw, C, ph, pw)
    return x.reshape(b, gh * gw, c * ph * pw)


def unpack_pixels(packed: torch.Tensor, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """Inverse of :func:`pack_pixels` for square cells: (B, L, C·p·p) → (B, C, gh·p, gw·p)."""
    b, n_cells, n = packed.shape
    gh, gw = grid
    p = math.isqrt(n // channels)
    if n_cells != gh * gw or channels * p * p != n:
        raise ValueError(f"packed pixels of shape {tuple(packed.shape)} do not fit a {gh}×{gw} "
                         f"grid of square {channels}-channel cells")
    x = packed.reshape(b, gh, gw, channels, p, p).permute(0, 3, 1, 4, 2, 5)  # (B, C, gh, p, gw, p)
    return x.reshape(b, channels, gh * p, gw * p)


def cell_fractions(grid: tuple[int, int]) -> torch.Tensor:
    """(L, 2) centre (y, x) of every cell as fractions of the image height and width."""
    gh, gw = grid
    ys = (torch.arange(gh, dtype=torch.float32) + 0.5) / gh
    xs = (torch.arange(gw, dtype=torch.float32) + 0.5) / gw
    return torch.stack([ys.repeat_interleave(gw), xs.repeat(gh)], 1)


# --- the three ways of taking a glimpse (pure functions) ---------------------------------------

def crop_starts(grid: tuple[int, int], size: tuple[int, int], glimpse: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """First pixel row (gh,) and column (gw,) of the G×G crop centred on each cell."""
    (gh, gw), (h, w) = grid, size
    cy = (torch.arange(gh) + 0.5) * (h / gh) - 0.5  # cell centres in pixel coordinates
    cx = (torch.arange(gw) + 0.5) * (w / gw) - 0.5
    return (torch.floor(cy - (glimpse - 1) / 2 + 0.5).long(),
            torch.floor(cx - (glimpse - 1) / 2 + 0.5).long())


def extract_crops(images: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, glimpse: int
                  ) -> torch.Tensor:
    """Hard crops I[y:y+G, x:x+G] at every (row start, column start) pair, zero outside the
    image: images (B, C, H, W), rows (gh,), cols (gw,) → (B, gh·gw, C, G, G)."""
    b, c = images.shape[:2]
    pad = F.pad(images, (glimpse, glimpse, glimpse, glimpse))  # zeros = the mean colour
    off = torch.arange(glimpse, device=images.device)
    r = (rows.to(images.device).unsqueeze(1) + off + glimpse)  # (gh, G)
    q = (cols.to(images.device).unsqueeze(1) + off + glimpse)  # (gw, G)
    crops = pad[:, :, r[:, None, :, None], q[None, :, None, :]]  # (B, C, gh, gw, G, G)
    return crops.permute(0, 2, 3, 1, 4, 5).reshape(b, len(rows) * len(cols), c, glimpse, glimpse)


def gaussian_filterbank(centre: torch.Tensor, delta: torch.Tensor, sigma: torch.Tensor, n: int,
                        size: int) -> torch.Tensor:
    """DRAW filterbank: (B, n, size), row i a Gaussian over pixel positions 0…size−1 centred at
    centre + (i − (n−1)/2)·δ with width σ, normalised to sum 1 (a softmax: stable far outside)."""
    i = torch.arange(n, device=centre.device, dtype=centre.dtype) - (n - 1) / 2  # (n,)
    mu = centre.unsqueeze(1) + i.unsqueeze(0) * delta.unsqueeze(1)  # (B, n)
    a = torch.arange(size, device=centre.device, dtype=centre.dtype)  # (size,)
    d2 = (a.view(1, 1, -1) - mu.unsqueeze(-1)) ** 2  # (B, n, size)
    return torch.softmax(-d2 / (2 * sigma.view(-1, 1, 1) ** 2), dim=-1)


def gaussian_glimpse(images: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor,
                     delta: torch.Tensor, sigma: torch.Tensor, n: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """g = F_Y I F_Xᵀ per channel: images (B, C, H, W), centre (cy, cx) in pixel coordinates (B,)
    → glimpse (B, C, n, n), F_Y (B, n, H), F_X (B, n, W)."""
    h, w = images.shape[-2:]
    fy = gaussian_filterbank(cy, delta, sigma, n, h)  # (B, n, H)
    fx = gaussian_filterbank(cx, delta, sigma, n, w)  # (B, n, W)
    glimpse = fy.unsqueeze(1) @ images @ fx.transpose(1, 2).unsqueeze(1)  # (B, C, n, n)
    return glimpse, fy, fx


def stn_glimpse(images: torch.Tensor, theta: torch.Tensor, n: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Spatial-transformer glimpse: θ (B, 2, 3) maps the n×n output's normalised coordinates to
    the input's; → glimpse (B, C, n, n) sampled bilinearly (zeros outside), grid (B, n, n, 2)."""
    b, c = images.shape[:2]
    grid = F.affine_grid(theta, [b, c, n, n], align_corners=False)  # (B, n, n, 2) (x, y)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False), grid


def grid_footprint(points: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Share of sampling points (B, P, 2) (x, y in [−1, 1]) falling in each cell: (B, L).
    Points outside the image count nowhere; a glimpse entirely outside gives a zero map."""
    gh, gw = grid
    u, v = (points[..., 0] + 1) / 2, (points[..., 1] + 1) / 2  # (B, P) fractions
    inside = (u >= 0) & (u < 1) & (v >= 0) & (v < 1)
    col = (u * gw).floor().clamp(0, gw - 1).long()
    row = (v * gh).floor().clamp(0, gh - 1).long()
    counts = points.new_zeros(points.shape[0], gh * gw)
    counts.scatter_add_(1, row * gw + col, inside.to(points.dtype))
    return counts / points.shape[1]


# --- the glimpse network ---------------------------------------------------------------------

class GlimpseNet(nn.Module):
    """Encodes a G×G glimpse and its window into a context vector (RAM's glimpse network):
    what = two stride-2 3×3 convolutions → linear; where = linear on the box; relu(what + where).
    No BatchNorm: a glimpse's code must not depend on which other rows share the batch."""

    def __init__(self, size: int, out_dim: int, channels: tuple[int, int] = (16, 32)):
        super().__init__()
        c1, c2 = channels
        self.conv = nn.Sequential(nn.Conv2d(3, c1, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.ReLU())
        side = -(-(-(-size // 2)) // 2)  # ⌈⌈G/2⌉/2⌉
        self.what = nn.Linear(c2 * side * side, out_dim)
        self.where = nn.Linear(4, out_dim)

    def forward(self, glimpses: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """glimpses (N, 3, G, G), boxes (N, 4) fractions (x0, y0, x1, y1) → (N, D)."""
        what = self.what(self.conv(glimpses).flatten(1))  # (N, D)
        return torch.relu(what + self.where(boxes * 2 - 1))


# --- the attention modules -------------------------------------------------------------------

class HardGlimpseMemory(NamedTuple):
    feats: torch.Tensor  # (B, L, D) annotations
    keys: torch.Tensor  # (B, L, A) score-function projections
    crops: torch.Tensor  # (B, L, D) glimpse-network code of the G×G crop centred on each cell
    boxes: torch.Tensor  # (B, L, 4) that crop's box as fractions of the image


class GlimpseMemory(NamedTuple):
    feats: torch.Tensor  # (B, L, D) annotations
    keys: torch.Tensor  # (B, L, A) score-function projections
    images: torch.Tensor  # (B, C, H, W) the normalised image


def _split(packed: torch.Tensor, feat_dim: int, grid: tuple[int, int]
           ) -> tuple[torch.Tensor, torch.Tensor]:
    if packed.shape[-1] <= feat_dim:
        raise ValueError("glimpse attention needs the image's pixels with the annotations: encode "
                         "images with Captioner.encode (a feature cache holds no pixels)")
    return packed[..., :feat_dim], unpack_pixels(packed[..., feat_dim:], grid)


class HardGlimpseAttention(HardAttention):
    """s ~ Cat(α) over the cells; context = GlimpseNet(G×G pixel crop centred on cell s).

    Every cell's glimpse is encoded once per image in :meth:`precompute` (the candidate
    locations are the cells), so the per-word cost is that of hard attention; the REINFORCE
    machinery (sampling by inverse CDF, mixing, test modes) is HardAttention's own.
    """

    kind = "glimpse_hard"
    stochastic = True
    needs_pixels = True
    shares_memory = False  # its boxes are looked up per state row

    def __init__(self, score: nn.Module, grid: tuple[int, int], feat_dim: int, glimpse: int = 16,
                 mc_samples: int = 8):
        super().__init__(score, grid, window=1, mc_samples=mc_samples)
        self.feat_dim = feat_dim
        self.glimpse = glimpse
        self.net = GlimpseNet(glimpse, feat_dim)

    def precompute(self, packed: torch.Tensor) -> HardGlimpseMemory:
        feats, images = _split(packed, self.feat_dim, self.grid)  # (B, L, D), (B, C, H, W)
        b, h, w = images.shape[0], images.shape[2], images.shape[3]
        rows, cols = crop_starts(self.grid, (h, w), self.glimpse)
        crops = extract_crops(images, rows, cols, self.glimpse)  # (B, L, C, G, G)
        y0 = rows.to(images.dtype).repeat_interleave(len(cols))  # (L,)
        x0 = cols.to(images.dtype).repeat(len(rows))
        g = self.glimpse
        boxes = torch.stack([x0 / w, y0 / h, (x0 + g) / w, (y0 + g) / h], 1).to(images.device)
        boxes = boxes.unsqueeze(0).expand(b, -1, -1)  # (B, L, 4)
        codes = self.net(crops.flatten(0, 1), boxes.reshape(-1, 4))  # (B·L, D)
        return HardGlimpseMemory(feats, self.score.precompute(feats),
                                 codes.view(b, -1, self.feat_dim), boxes.clamp(0.0, 1.0))

    def forward(self, mem: HardGlimpseMemory, h: torch.Tensor, mode: str = "sample",
                mix: torch.Tensor | None = None, noise: torch.Tensor | None = None
                ) -> AttentionOutput:
        out = super().forward(mem, h, mode, mix, noise)
        box = mem.boxes[torch.arange(len(out.location), device=h.device), out.location]  # (B, 4)
        return out._replace(aux={"window": box})


class _SoftGlimpse(nn.Module):
    """Shared by the differentiable glimpses: proposal α on the grid → centre E_α[cell centre];
    subclasses read the glimpse there (:meth:`look`)."""

    stochastic = False
    needs_pixels = True

    def __init__(self, score: nn.Module, grid: tuple[int, int], feat_dim: int, hidden_dim: int,
                 glimpse: int = 16):
        super().__init__()
        self.score = score
        self.grid = grid
        self.feat_dim = feat_dim
        self.glimpse = glimpse
        self.net = GlimpseNet(glimpse, feat_dim)
        self.register_buffer("cells", cell_fractions(grid), persistent=False)  # (L, 2) (y, x)

    def precompute(self, packed: torch.Tensor) -> GlimpseMemory:
        feats, images = _split(packed, self.feat_dim, self.grid)
        return GlimpseMemory(feats, self.score.precompute(feats), images)

    def look(self, images: torch.Tensor, centre: torch.Tensor, h: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(glimpse (B, C, G, G), footprint map (B, L), box (B, 4)) at centre (B, 2) fractions."""
        raise NotImplementedError

    def forward(self, mem: GlimpseMemory, h: torch.Tensor, mode: str = "expectation",
                mix: torch.Tensor | None = None, noise: torch.Tensor | None = None
                ) -> AttentionOutput:
        proposal = torch.softmax(self.score(mem.keys, h), dim=-1)  # (B, L)
        centre = proposal @ self.cells  # (B, 2) (y, x) fractions: differentiable in α
        glimpse, footprint, box = self.look(mem.images, centre, h)
        context = self.net(glimpse, box)  # (B, D)
        zeros = footprint.new_zeros(footprint.shape[0])
        return AttentionOutput(context, footprint, zeros, _entropy(footprint),
                               footprint.argmax(-1), {"window": box.detach().clamp(0.0, 1.0)})


class GaussianGlimpseAttention(_SoftGlimpse):
    """DRAW's separable Gaussian read at the proposed centre; stride δ and width σ from h."""

    kind = "glimpse_gaussian"

    def __init__(self, score: nn.Module, grid: tuple[int, int], feat_dim: int, hidden_dim: int,
                 glimpse: int = 16):
        super().__init__(score, grid, feat_dim, hidden_dim, glimpse)
        self.zoom = nn.Linear(hidden_dim, 2)  # log δ (0 = native resolution), log(σ / (δ/2))

    def look(self, images, centre, h):
        hh, ww = images.shape[-2:]
        n = self.glimpse
        z = self.zoom(h)  # (B, 2)
        # δ from a quarter pixel (magnify) to the stride that spans the whole image (n filters)
        delta = z[:, 0].clamp(math.log(0.25), math.log(max(hh, ww) / (n - 1))).exp()  # (B,)
        sigma = 0.5 * delta * z[:, 1].clamp(-3.0, 3.0).exp()  # (B,)
        cy, cx = centre[:, 0] * hh - 0.5, centre[:, 1] * ww - 0.5  # pixel coordinates
        glimpse, fy, fx = gaussian_glimpse(images, cy, cx, delta, sigma, n)
        gh, gw = self.grid
        rows = fy.sum(1).view(-1, gh, hh // gh).sum(-1) / n  # (B, gh) weight read per cell row
        cols = fx.sum(1).view(-1, gw, ww // gw).sum(-1) / n  # (B, gw)
        footprint = (rows.unsqueeze(2) * cols.unsqueeze(1)).flatten(1)  # (B, L), sums to 1
        half = n * delta / 2  # the filter centres span n·δ pixels
        box = torch.stack([(cx - half + 0.5) / ww, (cy - half + 0.5) / hh,
                           (cx + half + 0.5) / ww, (cy + half + 0.5) / hh], 1)
        return glimpse, footprint, box


class STNGlimpseAttention(_SoftGlimpse):
    """Spatial-transformer read: θ = [A | t], t the proposed centre, A = (G/W)(I + R h)."""

    kind = "glimpse_stn"

    def __init__(self, score: nn.Module, grid: tuple[int, int], feat_dim: int, hidden_dim: int,
                 glimpse: int = 16):
        super().__init__(score, grid, feat_dim, hidden_dim, glimpse)
        self.affine = nn.Linear(hidden_dim, 4)  # residual on the 2×2 linear part (zoom, shear, …)
        nn.init.normal_(self.affine.weight, std=0.01)  # start near an axis-aligned G×G crop
        nn.init.zeros_(self.affine.bias)

    def look(self, images, centre, h):
        hh, ww = images.shape[-2:]
        n = self.glimpse
        eye = torch.eye(2, device=h.device, dtype=h.dtype)
        scale = torch.tensor([n / ww, n / hh], device=h.device, dtype=h.dtype)  # (2,)
        lin = scale.view(1, 2, 1) * (eye + self.affine(h).view(-1, 2, 2))  # (B, 2, 2)
        t = torch.stack([centre[:, 1], centre[:, 0]], 1) * 2 - 1  # (B, 2) (x, y) in [−1, 1]
        theta = torch.cat([lin, t.unsqueeze(2)], 2)  # (B, 2, 3)
        glimpse, grid = stn_glimpse(images, theta, n)
        footprint = grid_footprint(grid.detach().flatten(1, 2), self.grid)  # (B, L)
        corners = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]],
                               device=h.device, dtype=h.dtype)  # (4, 2) output corners (x, y)
        pts = (corners @ lin.transpose(1, 2) + t.unsqueeze(1) + 1) / 2  # (B, 4, 2) fractions
        box = torch.cat([pts.min(1).values, pts.max(1).values], 1)  # (B, 4) x0, y0, x1, y1
        return glimpse, footprint, box
