"""Image encoders: a grid of annotation vectors a ∈ R^{B×L×D}, L = H·W cells.

Two families:
* ``ShapesCNN``: a small CNN for the built-in 64×64 data. Its receptive field is kept narrow
  (3×3 convs + 2×2 max-pools, symmetric padding) because grounding depends on how much of the
  image each cell sees: with a wide field every cell can read every object and attention need not
  move. Pools are stride-2 / kernel-2 so each output cell is centred on its own pixel block.
* torchvision backbones (resnet50/101/152, vgg16/19), cut before the classifier, adaptive-pooled to
  a configurable grid (14×14 for COCO), optionally partly fine-tuned.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class EncoderError(RuntimeError):
    """The backbone or its weights could not be built (one-line message)."""


@dataclass(frozen=True)
class Normalisation:
    """Mean/std the encoder's weights expect."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


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
        fmap = self.backbone(images)  # (B, C, h, w)
        if fmap.shape[-2:] != (self.grid, self.grid):
            fmap = F.adaptive_avg_pool2d(fmap, (self.grid, self.grid))  # (B, C, g, g)
        if self.coords:
            b, _, h, w = fmap.shape
            fmap = torch.cat([fmap, coord_channels(b, h, w, fmap.device, fmap.dtype)], 1)
        return fmap.flatten(2).transpose(1, 2)  # (B, L, D)


class ShapesCNN(nn.Sequential):
    """Narrow-field CNN for 64×64 inputs: three conv+pool stages (receptive field 22 px)."""

    def __init__(self, channels: int = 128):
        widths = [3, channels // 4, channels // 2, channels]
        layers: list[nn.Module] = []
        for cin, cout in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        # 1×1 convolutions add depth without widening what a cell sees.
        layers += [nn.Conv2d(channels, channels, 1), nn.ReLU(inplace=True)]
        super().__init__(*layers)


TORCHVISION_BACKBONES = ("resnet50", "resnet101", "resnet152", "vgg16", "vgg19")


def _torchvision_weights(name: str):
    import torchvision

    return torchvision.models.get_model_weights(name).DEFAULT


def _build_torchvision(name: str, weights: str) -> tuple[nn.Module, int, Normalisation, list[nn.Module]]:
    import torchvision

    enum = _torchvision_weights(name)
    tf = enum.transforms()
    norm = Normalisation(tuple(tf.mean), tuple(tf.std))  # from the weights, not hard-coded
    if weights == "imagenet":
        try:
            model = torchvision.models.get_model(name, weights=enum)
        except Exception as exc:  # urllib errors, hash mismatch, disk full…
            cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.url).name
            raise EncoderError(
                f"cannot load ImageNet weights for {name} ({type(exc).__name__}: {exc}); offline? "
                f"put {Path(enum.url).name} at {cache} or set encoder.weights to a local file"
            ) from None
    else:
        model = torchvision.models.get_model(name, weights=None)
        if weights != "none":
            path = Path(weights)
            if not path.is_file():
                raise EncoderError(f"encoder weights file not found: {path}")
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                model.load_state_dict(state)
            except Exception as exc:
                raise EncoderError(f"cannot load encoder weights {path}: {exc}".splitlines()[0]) from None
    if name.startswith("resnet"):
        blocks = [model.layer1, model.layer2, model.layer3, model.layer4]
        body = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, *blocks)
        channels = model.fc.in_features
    else:  # vgg: drop the last max-pool so a 224 input gives 14×14
        feats = list(model.features.children())[:-1]
        body = nn.Sequential(*feats)
        blocks = [m for m in feats if isinstance(m, nn.Conv2d)]
        channels = 512
    return body, channels, norm, blocks


def build_encoder(backbone: str = "shapes_cnn", weights: str = "none", grid: int = 8,
                  channels: int = 128, coords: bool = True, fine_tune_blocks: int = 0) -> Encoder:
    """Encoder from explicit arguments (see EncoderConfig for their meaning)."""
    if backbone == "shapes_cnn":
        if weights not in ("none", ""):
            path = Path(weights)
            if not path.is_file():
                raise EncoderError(f"encoder weights file not found: {path}")
        body = ShapesCNN(channels)
        if weights not in ("none", ""):
            try:
                body.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
            except Exception as exc:  # noqa: BLE001 - pickle/zip/shape errors alike
                raise EncoderError(f"cannot load encoder weights {weights}: "
                                   f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc}"
                                   ) from None
        # Synthetic images are normalised to roughly zero mean / unit spread.
        return Encoder(body, channels, grid, coords, Normalisation((0.5,) * 3, (0.25,) * 3), True)
    if backbone not in TORCHVISION_BACKBONES:
        raise EncoderError(f"unknown backbone {backbone!r}; choose shapes_cnn or one of "
                           f"{', '.join(TORCHVISION_BACKBONES)}")
    body, out_channels, norm, blocks = _build_torchvision(backbone, weights)
    for p in body.parameters():
        p.requires_grad_(False)
    for block in blocks[len(blocks) - fine_tune_blocks:] if fine_tune_blocks > 0 else []:
        for p in block.parameters():
            p.requires_grad_(True)
    return Encoder(body, out_channels, grid, coords, norm, trainable=fine_tune_blocks > 0)
