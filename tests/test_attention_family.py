"""The attention family (issue 17): local, multi-head, self-attention, glimpses on pixels.

Equivalences with the landed soft model, the glimpse operators against independent computations,
gradients, decoding (beam 1 == greedy, back-pointers of the per-step extras), the fast path, the
config keys and the data-path guard.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_batch
from showattend.decoding import beam_search, greedy
from showattend.losses import doubly_stochastic, masked_cross_entropy, reinforce_loss
from showattend.models.attention import SoftAttention
from showattend.models.captioner import Captioner
from showattend.models.encoder import build_encoder
from showattend.models.glimpse import (crop_starts, extract_crops, gaussian_glimpse, grid_footprint,
                                       pack_pixels, stn_glimpse, unpack_pixels)
from showattend.models.heads import MultiHeadAttention
from showattend.models.kinds import ATTENTIONS
from showattend.models.local import LocalAttention

# (name, Captioner.build kwargs): every new variant, tiny (4×4 grid on 32×32 images)
VARIANTS = {
    "local": {"attention": "local", "local_window": 3, "local_sigma": 1.0},
    "soft_heads": {"attention": "soft", "heads": 2},
    "local_heads": {"attention": "local", "heads": 2, "local_window": 3},
    "self_attention": {"attention": "soft", "self_attention_layers": 2, "self_attention_heads": 2,
                       "self_attention_dim": 16},
    "glimpse_hard": {"attention": "glimpse_hard", "glimpse_size": 12},
    "glimpse_gaussian": {"attention": "glimpse_gaussian", "glimpse_size": 12},
    "glimpse_stn": {"attention": "glimpse_stn", "glimpse_size": 12},
}


def build(seed: int = 0, **kw) -> Captioner:
    torch.manual_seed(seed)
    enc = build_encoder("shapes_cnn", grid=4, channels=16, coords=True)
    return Captioner.build(enc, 20, attn_dim=16, embed_dim=16, hidden_dim=32, dropout=0.0, **kw)


def peaked(model: Captioner) -> Captioner:
    """Larger attention weights: maps that move with the state (and samples that matter)."""
    with torch.no_grad():
        for name, p in model.decoder.attention.named_parameters():
            if ".net." not in f".{name}" and "value" not in name and "out." not in name:
                p.normal_(std=0.5)
    return model


def loss_of(model: Captioner, out, caps: torch.Tensor) -> torch.Tensor:
    targets = caps[:, 1:]
    mask = targets != 0
    if model.stochastic:  # the hard objective: CE + score-function + entropy terms
        hl = reinforce_loss(out.logits, targets, out.log_probs, out.entropies, baseline=-3.0,
                            lambda_r=0.5, lambda_e=0.1)
        return hl.loss + doubly_stochastic(out.alphas, mask)
    return masked_cross_entropy(out.logits, targets) + doubly_stochastic(out.alphas, mask)


def caps_with_lengths(b: int = 5, t: int = 9) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    caps = torch.randint(4, 20, (b, t), generator=g)
    caps[:, 0] = 1
    for i, e in enumerate([3, t - 1, 5, 1, 6][:b]):
        caps[i, e] = 2
        caps[i, e + 1:] = 0
    return caps


# --- local attention ---------------------------------------------------------------------------

def test_local_with_infinite_window_and_sigma_equals_soft_attention():
    from tolerances import STEP_K, assert_close_fp32

    soft = build(attention="soft").eval()
    local = build(seed=1, attention="local", local_window=math.inf, local_sigma=math.inf).eval()
    missing, unexpected = local.load_state_dict(soft.state_dict(), strict=False)
    assert unexpected == [] and missing and all(".centre." in k for k in missing)
    peaked(soft)
    local.load_state_dict(soft.state_dict(), strict=False)
    imgs, caps = tiny_batch(b=5)
    a, b = soft(imgs, caps), local(imgs, caps)
    assert_close_fp32(a.logits, b.logits, k=6 * STEP_K)  # 6 steps
    assert_close_fp32(a.alphas, b.alphas, k=6 * STEP_K)
    feats = soft.encode(imgs)
    ga, gb = greedy(soft, feats, max_len=8), greedy(local, feats, max_len=8)
    assert torch.equal(ga.tokens, gb.tokens)
    assert_close_fp32(ga.alphas, gb.alphas, k=8 * STEP_K)


def test_local_attention_stays_in_its_window_and_follows_the_gaussian():
    torch.manual_seed(0)
    from showattend.models.attention import AdditiveScore

    score = AdditiveScore(6, 8, 8)
    att = LocalAttention(score, (6, 6), hidden_dim=8, attn_dim=8, window=3, sigma=1.0)
    feats, h = torch.randn(4, 36, 6), torch.randn(4, 8)
    alpha, p = att.align(att.score.precompute(feats), h)  # (4, 36), (4, 2)
    d = att.cells.unsqueeze(0) - p.unsqueeze(1)  # (4, 36, 2)
    outside = (d.abs() > 1.5).any(-1)
    assert (alpha[outside] == 0).all() and (alpha[~outside] > 0).all()
    torch.testing.assert_close(alpha.sum(-1), torch.ones(4))
    # inside the window: α / softmax(e) ∝ the Gaussian of the distance to p
    e = att.score(att.score.precompute(feats), h)
    ratio = (alpha / e.exp()).log() + d.pow(2).sum(-1) / 2  # constant per row inside the window
    for r in range(4):
        inside = ratio[r][~outside[r]]
        assert float(inside.max() - inside.min()) < 1e-4
    # the centre learns through the Gaussian term
    alpha.pow(2).sum().backward()
    assert att.centre.W_p.weight.grad.abs().sum() > 0


# --- multi-head attention ---------------------------------------------------------------------

def one_head_copy(single: Captioner, value_eye: bool = True) -> Captioner:
    """The single-head model's weights in a 1-head MultiHeadAttention with W_v = W_o = I."""
    multi = copy.deepcopy(single)
    head = copy.deepcopy(single.decoder.attention)
    d = single.encoder.out_dim
    mha = MultiHeadAttention([head], d, value_dim=d)
    with torch.no_grad():
        mha.value.weight.copy_(torch.eye(d))
        mha.value.bias.zero_()
        mha.out.weight.copy_(torch.eye(d))
        mha.out.bias.zero_()
    multi.decoder.attention = mha
    return multi


@pytest.mark.parametrize("kind", ["soft", "local"])
def test_one_head_equals_the_single_head_model_given_the_same_weights(kind):
    from tolerances import STEP_K, assert_close_fp32

    single = peaked(build(attention=kind, local_window=3)).eval()
    multi = one_head_copy(single).eval()
    imgs, caps = tiny_batch(b=5)
    a, b = single(imgs, caps), multi(imgs, caps)
    assert_close_fp32(a.logits, b.logits, k=6 * STEP_K)  # 6 steps
    assert_close_fp32(a.alphas, b.alphas, k=6 * STEP_K)
    feats = single.encode(imgs)
    ba, bb = beam_search(single, feats, beam=3, max_len=8), beam_search(multi, feats, beam=3,
                                                                         max_len=8)
    assert torch.equal(ba.tokens, bb.tokens)
    assert_close_fp32(ba.scores, bb.scores, k=8 * STEP_K)
    torch.testing.assert_close(bb.aux["heads"][:, :, 0], bb.alphas)  # one head: its map = mean


def test_two_identical_heads_averaged_by_w_o_equal_one_head():
    """Concatenation order and the mean map: [z; z] through W_o = [I/2, I/2] is z."""
    from tolerances import STEP_K, assert_close_fp32

    single = peaked(build(attention="soft")).eval()
    d = single.encoder.out_dim
    multi = copy.deepcopy(single)
    mha = MultiHeadAttention([copy.deepcopy(single.decoder.attention) for _ in range(2)], d,
                             value_dim=d)
    with torch.no_grad():
        mha.value.weight.copy_(torch.cat([torch.eye(d), torch.eye(d)]))
        mha.value.bias.zero_()
        mha.out.weight.copy_(torch.cat([torch.eye(d), torch.eye(d)], 1) / 2)
        mha.out.bias.zero_()
    multi.decoder.attention = mha
    imgs, caps = tiny_batch(b=4)
    assert_close_fp32(single(imgs, caps).logits, multi(imgs, caps).logits, k=6 * STEP_K)


def test_heads_have_their_own_projections_and_maps():
    model = peaked(build(attention="soft", heads=2)).eval()
    heads = model.decoder.attention.heads
    assert heads[0].score.proj_a.weight.shape == (8, model.encoder.out_dim)  # dim / heads each
    assert heads[0].score.proj_a.weight.data_ptr() != heads[1].score.proj_a.weight.data_ptr()
    dec = greedy(model, model.encode(tiny_batch(b=3)[0]), max_len=6)
    per_head = dec.aux["heads"]  # (B, T, 2, L)
    torch.testing.assert_close(per_head.mean(2), dec.alphas)
    assert float((per_head[:, :, 0] - per_head[:, :, 1]).abs().max()) > 1e-3  # heads differ


# --- glimpse operators --------------------------------------------------------------------------

def test_gaussian_glimpse_over_the_whole_image_returns_the_image_resampled():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(2, 3, 16, 16, generator=g)
    one = torch.ones(2)
    centre = one * 7.5  # (W − 1) / 2: the image's centre in pixel coordinates
    # N = W filters, stride 1, narrow: the identity resampling
    same, fy, fx = gaussian_glimpse(img, centre, centre, one, one * 0.05, 16)
    torch.testing.assert_close(same, img, rtol=0, atol=1e-5)
    # N = W/2 filters at stride 2 span the whole image; each centre falls between two pixels,
    # so narrow filters average pixel pairs: 2×2 average pooling
    half, fy, _ = gaussian_glimpse(img, centre, centre, one * 2, one * 0.3, 8)
    torch.testing.assert_close(half, F.avg_pool2d(img, 2), rtol=0, atol=1e-4)
    torch.testing.assert_close(fy.sum(-1), torch.ones(2, 8))  # each filter normalised


def test_stn_identity_transform_returns_its_input_and_a_shift_moves_it():
    from tolerances import assert_close_fp32

    img = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    eye = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(2, 2, 3)
    out, grid = stn_glimpse(img, eye, 12)
    # fp32 sampling coordinates are off by a few eps·12 pixels (the affine map's 3-term dot,
    # scaled to the 12-pixel image), which interpolation turns into that fraction of a pixel
    # step: k = 12² makes √k = 12
    assert_close_fp32(out, img, k=12 ** 2)
    shift = eye.clone()
    shift[:, 0, 2] = 2 / 12  # one pixel to the right in normalised coordinates
    moved, _ = stn_glimpse(img, shift, 12)
    assert_close_fp32(moved[..., :-1], img[..., 1:], k=12 ** 2)
    assert (moved[..., -1] == 0).all()  # zeros outside the image
    # the footprint of the identity grid is uniform over the cells
    torch.testing.assert_close(grid_footprint(grid.flatten(1, 2), (3, 3)), torch.full((2, 9), 1 / 9))


def test_hard_crops_are_the_image_slices_centred_on_each_cell():
    img = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).view(2, 3, 16, 16)
    rows, cols = crop_starts((4, 4), (16, 16), 6)
    assert rows.tolist() == [-1, 3, 7, 11]  # cell centres 1.5, 5.5, ...: 6 pixels around them
    crops = extract_crops(img, rows, cols, 6)  # (2, 16, 3, 6, 6)
    torch.testing.assert_close(crops[:, 5], img[:, :, 3:9, 3:9])  # cell (1, 1)
    assert (crops[:, 0, :, 0, :] == 0).all() and (crops[:, 0, :, 1:, 1:] == img[:, :, :5, :5]).all()


def test_pixels_pack_and_unpack_losslessly():
    img = torch.randn(2, 3, 32, 32)
    packed = pack_pixels(img, (4, 4))  # (2, 16, 192)
    assert packed.shape == (2, 16, 3 * 8 * 8)
    torch.testing.assert_close(packed[0, 5].view(3, 8, 8), img[0, :, 8:16, 8:16])  # cell (1, 1)
    assert torch.equal(unpack_pixels(packed, (4, 4)), img)


def test_glimpse_context_depends_on_the_pixels_not_only_on_the_annotations():
    model = peaked(build(**VARIANTS["glimpse_gaussian"])).eval()
    imgs, caps = tiny_batch(b=2)
    feats = model.encode(imgs)
    d = model.feat_dim
    other = feats.clone()
    other[..., d:] = torch.randn_like(other[..., d:])  # same annotations, other pixels
    assert not torch.allclose(model(imgs, caps, feats=feats).logits,
                              model(imgs, caps, feats=other).logits)
    with pytest.raises(ValueError, match="pixels"):  # annotations without pixels: a clear error
        model(imgs, caps, feats=feats[..., :d])


# --- every variant: gradients, decoding, fast path ----------------------------------------------

@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_parameter_of_every_variant_gets_a_gradient(name):
    model = peaked(build(**VARIANTS[name]))
    imgs, caps = tiny_batch()
    out = model(imgs, caps)
    loss_of(model, out, caps).backward()
    # the additive score's output bias shifts every cell's score alike, which the softmax ignores:
    # its gradient is 0 but for rounding (exactly 0.0 on some hosts), so it need only be reached
    missing = [n for n, p in model.named_parameters()
               if p.grad is None or not (p.grad.abs().sum() > 0 or n.endswith("score.out.bias"))]
    assert missing == []


def image_dependent(model: Captioner) -> tuple[Captioner, torch.Tensor]:
    """The model with its state and context paths scaled up, and annotations (6, 16, D [+ the
    pixels]) that differ strongly, so that the image decides the caption and its length (an
    untrained tiny model captions all images alike, and a decoding bug that mixed up images or
    steps would go unnoticed). Deterministic: the first seed and <end> bias (of a few) for which
    greedy gives at least 3 different captions of at least 2 different lengths."""
    with torch.no_grad():
        for name, p in model.decoder.named_parameters():
            if name.startswith(("L_z", "L_h", "init_", "lstm")):
                p.mul_(3.0)
    model.eval()
    base = model.encode(tiny_batch(b=6)[0] * 3)  # glimpse models: the pixels come along
    end_bias = float(model.decoder.L_o.bias[2])
    for bias in (0.0, 0.5, 1.0, -0.5):
        for seed in range(6):
            feats = base.clone()
            g = torch.Generator().manual_seed(seed)
            feats[..., : model.feat_dim] = torch.randn(6, 16, model.feat_dim, generator=g) * 2
            with torch.no_grad():
                model.decoder.L_o.bias[2] = end_bias + bias
            dec = greedy(model, feats, max_len=10)
            caps = {tuple(dec.tokens[i, : int(dec.lengths[i])].tolist()) for i in range(6)}
            if len(caps) >= 3 and len(set(dec.lengths.tolist())) >= 2:
                return model, feats
    raise AssertionError("no image-dependent setting found")


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_beam_one_equals_greedy_for_every_variant(name):
    from tolerances import STEP_K, assert_close_fp32

    model, feats = image_dependent(peaked(build(**VARIANTS[name])))
    g = greedy(model, feats, max_len=10)
    b = beam_search(model, feats, beam=1, max_len=10)
    assert torch.equal(g.lengths, b.lengths)
    assert_close_fp32(g.scores, b.scores, k=10 * STEP_K)  # 10 steps
    assert (g.aux is None) == (b.aux is None)
    for i in range(6):
        n = int(g.lengths[i]) + 1  # words and <end>; greedy keeps stepping finished rows
        assert torch.equal(g.tokens[i, :n], b.tokens[i, :n])
        assert_close_fp32(g.alphas[i, :n], b.alphas[i, :n], k=10 * STEP_K)
        assert torch.equal(g.locations[i, :n], b.locations[i, :n])
        for key in g.aux or {}:
            assert_close_fp32(g.aux[key][i, :n], b.aux[key][i, :n], k=10 * STEP_K, msg=key)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_fast_teacher_forced_path_equals_the_stepwise_one(name):
    from tolerances import STEP_K, assert_close_fp32, norm_of

    model = peaked(build(**VARIANTS[name]))
    imgs = tiny_batch(b=5)[0]
    caps = caps_with_lengths()
    kw = {}
    if model.stochastic:
        kw["noise"] = torch.rand(5, caps.shape[1] - 1, generator=torch.Generator().manual_seed(4))
        kw["mix"] = torch.tensor([True, False, False, True, False])
    results = []
    for fn in (model.forward, model.forward_stepwise):
        model.zero_grad()
        out = fn(imgs, caps, **kw)
        loss = loss_of(model, out, caps)
        loss.backward()
        results.append((out, loss.detach(), {n: p.grad.clone() for n, p in
                                             model.named_parameters()}))
    (fast, lf, gf), (slow, ls, gs) = results
    assert_close_fp32(lf, ls, k=8 * STEP_K)  # 8 steps
    scale = norm_of(gs.values())  # a softmax's shift-invariant bias has a gradient of 0 ± rounding
    for n in gf:  # back through the 8 steps
        assert_close_fp32(gf[n], gs[n], k=2 * 8 * STEP_K, scale=scale, msg=n)
    real = caps[:, 1:] != 0
    assert_close_fp32(fast.alphas[real], slow.alphas[real], k=8 * STEP_K)


@pytest.mark.parametrize("name", ["soft_heads", "local", "glimpse_stn", "glimpse_hard"])
def test_beam_extras_follow_the_back_pointers(name):
    """The per-step extras of the best beam are those of replaying its words step by step."""
    from tolerances import STEP_K, assert_close_fp32

    model, feats = image_dependent(peaked(build(**VARIANTS[name])))
    if model.stochastic:
        model.test_mode = "argmax"
    dec = beam_search(model, feats, beam=3, max_len=8)
    mem, state = model.memory(feats), model.decoder.init_state(feats)
    prev = torch.full((6,), 1, dtype=torch.long)
    for t in range(dec.tokens.shape[1]):
        out = model.decoder.step(mem, state, prev, model.test_mode)
        live = torch.arange(6)[dec.lengths >= t]  # images still producing words (or <end>)
        k = (t + 1) * STEP_K  # t + 1 steps
        assert_close_fp32(dec.alphas[live, t], out.attn.alpha[live], k=k)
        for key, v in out.attn.aux.items():
            assert_close_fp32(dec.aux[key][live, t], v[live], k=k, msg=key)
        state, prev = out.state, dec.tokens[:, t].clamp_min(2)  # <pad> after <end>: any word


def test_self_attention_makes_cells_depend_on_each_other():
    model = build(**VARIANTS["self_attention"]).eval()
    base = build().eval()
    feats = torch.randn(2, 16, model.feat_dim)
    changed = feats.clone()
    changed[:, 0] += 1.0  # change cell 0 only
    mem_a, mem_b = model.memory(feats), model.memory(changed)
    assert not torch.allclose(mem_a.feats[:, 5], mem_b.feats[:, 5])  # cell 5 sees cell 0
    torch.testing.assert_close(base.memory(feats).feats[:, 5], base.memory(changed).feats[:, 5])
    # positions: the same annotation in two cells is told apart
    same = torch.randn(1, model.feat_dim).expand(2, 16, -1)
    out = model.memory(same).feats
    assert not torch.allclose(out[:, 0], out[:, 1])


def test_self_attention_trains_when_the_cnn_is_frozen():
    from showattend.config import TrainConfig
    from showattend.train import build_optimizer

    model = build(**VARIANTS["self_attention"])
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    opt = build_optimizer(model, TrainConfig())
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in in_opt for p in model.self_attention.parameters())
    assert not any(id(p) in in_opt for p in model.encoder.parameters())
    assert len(opt.param_groups) == 1


def test_default_model_has_the_landed_parameters():
    """No new parameter sneaks into the plain model: old checkpoints load as before."""
    model = build()
    names = {n for n, _ in model.named_parameters()}
    assert not any(n.startswith("self_attention") for n in names)
    assert {n for n in names if n.startswith("decoder.attention.")} == {
        "decoder.attention.score.proj_a.weight", "decoder.attention.score.proj_a.bias",
        "decoder.attention.score.proj_h.weight", "decoder.attention.score.out.weight",
        "decoder.attention.score.out.bias"}
    assert isinstance(model.decoder.attention, SoftAttention)


# --- config and data path ----------------------------------------------------------------------

def test_config_kinds_are_the_registry():
    from showattend.config import _CHOICES

    assert set(_CHOICES[("attention", "kind")]) == set(ATTENTIONS)


@pytest.mark.parametrize("override, message", [
    (["attention.kind=sparse"], "attention.kind"),
    (["attention.heads=2", "attention.kind=hard"], "soft and local attention only"),
    (["attention.heads=3"], "divisible by attention.heads"),
    (["attention.local_window=0", "attention.kind=local"], "local_window"),
    (["attention.kind=glimpse_stn", "encoder.image_size=60"], "divisible by encoder.grid"),
    (["attention.kind=glimpse_hard", "attention.glimpse_size=80"], "larger than the image"),
    (["encoder.self_attention_layers=-1"], "self_attention_layers"),
    (["encoder.self_attention_layers=2", "encoder.self_attention_dim=30"], "divisible"),
    (["attention.head=2"], "unknown config key attention.head"),
])
def test_bad_attention_family_configs_fail_clearly(override, message):
    from showattend.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(None, override)


def test_every_variant_builds_from_a_config():
    from showattend.config import load_config

    for extra in (["attention.kind=local", "attention.local_sigma=inf"],
                  ["attention.heads=4"], ["encoder.self_attention_layers=2"],
                  ["attention.kind=glimpse_gaussian"]):
        cfg = load_config(None, extra)
        model = Captioner.from_config(cfg, 10)
        assert model.attention_kind == cfg.attention.kind


def test_glimpses_refuse_a_feature_cache_with_a_clear_error():
    from types import SimpleNamespace

    from showattend.config import load_config
    from showattend.data.prepared import PreparedDataError, use_features

    cfg = load_config(None, ["attention.kind=glimpse_stn"])
    model = Captioner.from_config(cfg, 10)
    for p in model.encoder.parameters():
        p.requires_grad_(False)  # a frozen CNN: the case where the cache would be used
    folder = SimpleNamespace(has_features=True, path="prep")
    with pytest.raises(PreparedDataError, match="glimpses of the image's pixels.*features = \"off\""):
        use_features(cfg, model, folder)
    off = load_config(None, ["attention.kind=glimpse_stn", "data.features=off"])
    assert use_features(off, model, folder) is False


# --- end to end: train, caption --json, overlays ------------------------------------------------

@pytest.mark.parametrize("kind, extra", [
    ("local", ["attention.heads=2"]),
    ("glimpse_gaussian", []),
    ("glimpse_hard", []),
])
def test_cli_trains_and_captions_every_family_member_with_json_and_overlays(
        tmp_path, capsys, shapes_dir, kind, extra):
    import json

    import numpy as np

    from conftest import tiny_toml
    from showattend.cli import main

    cfg = tmp_path / "run.toml"
    cfg.write_text(tiny_toml(tmp_path / "run", shapes_dir, kind="soft", n_train=24, n_eval=8,
                             epochs=1, batch_size=12))
    assert main(["-q", "train", "--config", str(cfg), f'attention.kind="{kind}"',
                 "attention.glimpse_size=12", *extra]) == 0
    images = sorted((shapes_dir / "images" / "test").glob("*.png"))[:2]
    capsys.readouterr()
    assert main(["-q", "caption", *map(str, images), "--checkpoint", str(tmp_path / "run"),
                 "--json", "--overlay-dir", str(tmp_path / "ov")]) == 0
    records = json.loads(capsys.readouterr().out)
    assert len(records) == 2
    for rec in records:
        n = len(rec["words"])
        att = np.asarray(rec["attention"])
        assert att.shape == (n, 8, 8)
        np.testing.assert_allclose(att.sum((1, 2)), 1.0, rtol=1e-4)
        if "heads=2" in " ".join(extra):
            heads = np.asarray(rec["head_attention"])  # (n, 2, 8, 8), their mean is "attention"
            assert heads.shape == (n, 2, 8, 8)
            np.testing.assert_allclose(heads.mean(1), att, atol=1e-5)
        else:
            assert "head_attention" not in rec
        if "heads=2" in " ".join(extra):  # several local windows: per head in the maps only
            assert "boxes" not in rec
            continue
        boxes = np.asarray(rec["boxes"])  # the window looked at for every word, in pixels
        assert boxes.shape == (n, 4)
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 64).all()
        assert (boxes[:, 2:] > boxes[:, :2]).all()
        if kind == "glimpse_hard":  # the 12-pixel crop around the chosen cell
            np.testing.assert_allclose((boxes[:, 2:] - boxes[:, :2]).max(), 12)
    assert len(list((tmp_path / "ov").glob("*.png"))) == 2
