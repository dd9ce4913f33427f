"""Image encoders: a grid of annotation vectors a ∈ R^{B×L×D}, L = H·W cells.

An :class:`Encoder` wraps a backbone from the registry in :mod:`showattend.models.backbones`
(which network, which weights, which normalisation — ``shapes_cnn``, torchvision resnet/vgg,
EfficientNet-Lite with offline weights), adaptive-pools its feature map to a configurable grid
(14×14 for COCO) and flattens it; the last ``fine_tune_blocks`` blocks of a pretrained backbone
can be trained.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from showattend import precision
# Re-exported: these names have always been importable from here.
from showattend.models.backbones import (BACKBONES, EncoderError, Normalisation, ShapesCNN,
                                         get_backbone)

__all__ = ["BACKBONES", "Encoder", "EncoderError", "Normalisation", "ShapesCNN",
           "build_encoder", "coord_channels"]

def coord_channels(b: int, h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """x and y of every cell centre in [-1, 1]: (B, 2, H, W)."""
    ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h * 2 - 1  # (H,)
    xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w * 2 - 1  # (W,)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=0)  # (2, H, W)
    return grid.unsqueeze(0).expand(b, -1, -1, -1)


class Encoder(nn.Module):
    """Backbone → (B, C, h, w) → adaptive pool to (grid, grid) → (+coords) → (B, L, D)."""

    def __init__(self, backbone: nn.Module, channels: int, grid: int, coords: bool,
                 normalisation: Normalisation, trainable: bool = True):
        super().__init__()
        self.backbone = backbone
        self.grid = grid
        self.coords = coords
        self.out_dim = channels + (2 if coords else 0)
        self.normalisation = normalisation
        self.frozen_backbone = not trainable

    def train(self, mode: bool = True) -> Encoder:
        super().train(mode)
        if self.frozen_backbone:
            self.backbone.eval()  # frozen BatchNorm keeps its pretrained statistics
        elif mode:
            # partial fine-tuning: BatchNorm layers of the frozen blocks keep their statistics too
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(
                        p.requires_grad for p in m.parameters()):
                    m.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) normalised → annotations (B, L, D)."""
        with precision.encoder_context(self.backbone, images) as x:  # bf16 convs (precision.py)
            fmap = self.backbone(x).float()  # (B, C, h, w)
        if fmap.shape[-2:] != (self.grid, self.grid):
            fmap = F.adaptive_avg_pool2d(fmap, (self.grid, self.grid))  # (B, C, g, g)
        if self.coords:
            b, _, h, w = fmap.shape
            fmap = torch.cat([fmap, coord_channels(b, h, w, fmap.device, fmap.dtype)], 1)
        return fmap.flatten(2).transpose(1, 2)  # (B, L, D)


def build_encoder(backbone: str = "shapes_cnn", weights: str = "none", grid: int = 8,
                  channels: int = 128, coords: bool = True, fine_tune_blocks: int = 0) -> Encoder:
    """Encoder from explicit arguments (see EncoderConfig for their meaning)."""
    spec = get_backbone(backbone)
    built = spec.build(weights, channels)
    norm = spec.normalisation()
    if not spec.pretrained:  # trained from scratch: every parameter learns
        return Encoder(built.body, built.channels, grid, coords, norm, trainable=True)
    if fine_tune_blocks > len(built.blocks):
        raise EncoderError(f"encoder.fine_tune_blocks = {fine_tune_blocks}, but {backbone} has "
                           f"only {len(built.blocks)} blocks")
    for p in built.body.parameters():
        p.requires_grad_(False)
    for block in built.blocks[len(built.blocks) - fine_tune_blocks:] if fine_tune_blocks > 0 else []:
        for p in block.parameters():
            p.requires_grad_(True)
    return Encoder(built.body, built.channels, grid, coords, norm, trainable=fine_tune_blocks > 0)
