"""Encoders: grid shapes, cell alignment, torchvision backbones offline, weights files."""

from __future__ import annotations

import pytest
import torch

from showattend.models.encoder import EncoderError, ShapesCNN, build_encoder


def test_shapes_cnn_grid_and_coords():
    enc = build_encoder("shapes_cnn", grid=8, channels=16, coords=True)
    out = enc(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 64, 16 + 2)
    # coordinate channels: x grows along columns, y along rows, cell centres in (-1, 1)
    xy = out[0, :, -2:].reshape(8, 8, 2)
    assert torch.allclose(xy[0, :, 0], torch.linspace(-7 / 8, 7 / 8, 8))
    assert torch.allclose(xy[:, 0, 1], torch.linspace(-7 / 8, 7 / 8, 8))


def test_shapes_cnn_receptive_field_is_narrow_and_centred():
    """Cell (r, c) only sees its own 8×8 block plus at most 7 px on each side (symmetric)."""
    torch.manual_seed(0)
    net = ShapesCNN(16).eval()
    for r, c in [(0, 0), (3, 5), (7, 2), (4, 4)]:
        img = torch.randn(1, 3, 64, 64, requires_grad=True)
        net(img)[0, :, r, c].sum().backward()
        ys, xs = torch.nonzero(img.grad.abs().sum((0, 1)), as_tuple=True)
        assert len(ys) > 0
        lo_y, hi_y, lo_x, hi_x = r * 8 - 7, r * 8 + 8 + 7, c * 8 - 7, c * 8 + 8 + 7
        assert lo_y <= int(ys.min()) and int(ys.max()) < hi_y
        assert lo_x <= int(xs.min()) and int(xs.max()) < hi_x
        # the support reaches into the cell's own block
        assert ((ys >= r * 8) & (ys < r * 8 + 8) & (xs >= c * 8) & (xs < c * 8 + 8)).any()


@pytest.mark.parametrize("name, channels", [("resnet50", 2048), ("vgg16", 512)])
def test_torchvision_backbone_grid_and_normalisation(name, channels):
    import torchvision

    enc = build_encoder(name, weights="none", grid=7, coords=False, fine_tune_blocks=1)
    with torch.no_grad():
        out = enc.eval()(torch.randn(1, 3, 112, 112))
    assert out.shape == (1, 49, channels)
    tf = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    assert tuple(enc.normalisation.mean) == tuple(tf.mean)
    assert tuple(enc.normalisation.std) == tuple(tf.std)
    trainable = {n.split(".")[0] for n, p in enc.backbone.named_parameters() if p.requires_grad}
    assert trainable and len(trainable) == 1  # only the last block


def test_imagenet_weights_offline_gives_clear_error(monkeypatch, tmp_path):
    import torch.hub

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*a, **k):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(EncoderError, match="cannot load ImageNet weights for resnet101.*offline"):
        build_encoder("resnet101", weights="imagenet")


def test_local_weights_file(tmp_path):
    import torchvision

    m = torchvision.models.vgg16(weights=None)
    torch.save(m.state_dict(), tmp_path / "vgg16.pth")
    enc = build_encoder("vgg16", weights=str(tmp_path / "vgg16.pth"), grid=2, coords=False)
    torch.testing.assert_close(enc.backbone[0].weight, m.features[0].weight)
    with pytest.raises(EncoderError, match="not found"):
        build_encoder("vgg16", weights=str(tmp_path / "missing.pth"))
    with pytest.raises(EncoderError, match="unknown backbone"):
        build_encoder("alexnet")
