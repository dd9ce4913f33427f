"""The full model: encoder + attention + decoder, and its construction from a Config."""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
from torch import nn

from showattend.models.attention import Memory, repeat_rows
from showattend.models.backbones import get_backbone
from showattend.models.decoder import Decoder
from showattend.models.ensemble import EnsembleDecoder
from showattend.models.encoder import Encoder, build_encoder
from showattend.models.glimpse import pack_pixels
from showattend.models.kinds import AttentionArgs, build_attention
from showattend.models.selfattn import GridSelfAttention
from showattend.vocab import PAD_ID


class CaptionerOutput(NamedTuple):
    """Teacher-forced outputs, time-major within each sample (never reordered).

    The vocabulary logits are packed, one row per computed position (the fast path computes the
    real positions only); ``logits`` spreads them over (B, T, V) with zeros elsewhere, for
    readers that want the grid. The losses read the packed rows (losses.token_nll).
    """

    packed_logits: torch.Tensor  # (P, V)
    alphas: torch.Tensor  # (B, T, L)
    betas: torch.Tensor  # (B, T)
    log_probs: torch.Tensor  # (B, T) log p(s_t) of sampled locations (hard), zeros otherwise
    entropies: torch.Tensor  # (B, T) attention entropy per step
    positions: torch.Tensor  # (P, 2) (caption, step) of each row of packed_logits

    @property
    def logits(self) -> torch.Tensor:
        """(B, T, V): the packed rows at their positions, zeros where nothing was computed."""
        b, t = self.alphas.shape[:2]
        full = self.packed_logits.new_zeros(b, t, self.packed_logits.shape[-1])
        return full.index_put((self.positions[:, 0], self.positions[:, 1]), self.packed_logits)


_GRID_WARNED: set[tuple[str, int, int]] = set()


def warn_upsampled_grid(backbone: str, grid: int, image_size: int) -> None:
    """One line (once per setting) when ``encoder.grid`` is finer than the backbone's own
    feature map at ``image_size``: adaptive pooling then repeats cells — a larger cache and
    slower steps for no new information."""
    spec = get_backbone(backbone)
    native = spec.grid_at(image_size)
    if not spec.pretrained or grid <= native or (backbone, grid, image_size) in _GRID_WARNED:
        return
    _GRID_WARNED.add((backbone, grid, image_size))
    logging.getLogger(__name__).warning(
        "encoder.grid = %d is finer than %s's own %d×%d grid at %d px: its cells are repeated, "
        "not new (%.0f× the annotations); use encoder.grid = %d, or encoder.image_size = %d for "
        "a %d×%d grid", grid, backbone, native, native, image_size, (grid / native) ** 2, native,
        grid * spec.stride, grid, grid)


class Captioner(nn.Module):
    """Show, Attend and Tell captioner."""

    def __init__(self, encoder: Encoder, decoder: Decoder, test_mode: str = "expectation",
                 self_attention: nn.Module | None = None):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.test_mode = test_mode  # attention mode used by decoding (hard: argmax/sample/...)
        # Transformer layers over the annotations (selfattn.py). Applied in ``memory``, after
        # the CNN and after a feature cache, so they train even when the CNN is frozen; absent
        # by default so that checkpoints of the plain model load unchanged.
        self.self_attention = self_attention

    @property
    def grid(self) -> tuple[int, int]:
        return self.decoder.attention.grid

    @property
    def attention_kind(self) -> str:
        return self.decoder.attention.kind

    @property
    def stochastic(self) -> bool:
        """Sampled attention locations (hard, glimpse_hard): REINFORCE in training, test modes."""
        return bool(getattr(self.decoder.attention, "stochastic", False))

    @property
    def needs_pixels(self) -> bool:
        """Glimpse attention reads the image at every word: ``encode`` packs its pixels in."""
        return bool(getattr(self.decoder.attention, "needs_pixels", False))

    @property
    def feat_dim(self) -> int:
        """Width D of the annotations (the encoder's output, before any packed pixels)."""
        return self.encoder.out_dim

    @classmethod
    def from_config(cls, cfg, vocab_size: int) -> Captioner:
        """Map a Config to explicit constructor arguments (tests build models without configs).
        ``decoder.ensemble`` = N > 1: N decoders on the one encoder, decoding as one."""
        warn_upsampled_grid(cfg.encoder.backbone, cfg.encoder.grid, cfg.encoder.image_size)
        enc = build_encoder(cfg.encoder.backbone, cfg.encoder.weights, cfg.encoder.grid,
                            cfg.encoder.channels, cfg.encoder.coords, cfg.encoder.fine_tune_blocks)
        a, e = cfg.attention, cfg.encoder
        args = dict(attention=a.kind, score=a.score, attn_dim=a.dim, window=a.window,
                    mc_samples=a.mc_samples, embed_dim=cfg.decoder.embed_dim,
                    hidden_dim=cfg.decoder.hidden_dim, dropout=cfg.decoder.dropout,
                    beta=cfg.decoder.beta, deep_output=cfg.decoder.deep_output,
                    test_mode=a.test_mode, heads=a.heads, local_window=a.local_window,
                    local_sigma=a.local_sigma, glimpse_size=a.glimpse_size,
                    self_attention_layers=e.self_attention_layers,
                    self_attention_heads=e.self_attention_heads,
                    self_attention_dim=e.self_attention_dim)
        n = cfg.decoder.ensemble
        if n == 1:
            return cls.build(enc, vocab_size, **args)
        if e.self_attention_layers:
            raise ValueError("ensembles of models with self-attention layers are not built")
        members = [cls.build(enc, vocab_size, **args).decoder for _ in range(n)]
        return cls(enc, EnsembleDecoder(members), "expectation")

    @classmethod
    def build(cls, encoder: Encoder, vocab_size: int, attention: str = "soft",
              score: str = "additive", attn_dim: int = 128, window: int = 1, mc_samples: int = 8,
              embed_dim: int = 64, hidden_dim: int = 256, dropout: float = 0.3,
              beta: str = "scalar", deep_output: bool = True,
              test_mode: str = "argmax", heads: int = 1, local_window: float = 5,
              local_sigma: float = 0.0, glimpse_size: int = 16, self_attention_layers: int = 0,
              self_attention_heads: int = 4, self_attention_dim: int = 128) -> Captioner:
        """Assemble a captioner around ``encoder`` (attention kinds: models/kinds.py)."""
        grid = (encoder.grid, encoder.grid)
        attn = build_attention(attention, AttentionArgs(
            feat_dim=encoder.out_dim, hidden_dim=hidden_dim, grid=grid, score=score,
            attn_dim=attn_dim, window=window, mc_samples=mc_samples, heads=heads,
            local_window=local_window, local_sigma=local_sigma, glimpse_size=glimpse_size))
        dec = Decoder(vocab_size, encoder.out_dim, attn, embed_dim, hidden_dim, dropout, beta,
                      deep_output)
        sa = (GridSelfAttention(encoder.out_dim, grid, self_attention_layers,
                                self_attention_heads, self_attention_dim, dropout)
              if self_attention_layers > 0 else None)
        return cls(encoder, dec, test_mode if getattr(attn, "stochastic", False)
                   else "expectation", sa)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) → annotations (B, L, D).

        Glimpse attention: (B, L, D + 3·p²), each cell's p×p pixels appended to its annotation
        (glimpse.pack_pixels), so everything that passes annotations around carries the image.
        """
        feats = self.encoder(images)  # (B, L, D)
        if self.needs_pixels:
            feats = torch.cat([feats, pack_pixels(images, self.grid).to(feats.dtype)], -1)
        return feats

    def memory(self, feats: torch.Tensor) -> Memory:
        """Per-image attention memory (projections computed once; self-attention layers first)."""
        if self.self_attention is not None:
            d = self.feat_dim
            ctx = self.self_attention(feats[..., :d])  # (B, L, D): packed pixels pass untouched
            feats = torch.cat([ctx, feats[..., d:]], -1) if feats.shape[-1] > d else ctx
        return self.decoder.attention.precompute(feats)

    def default_mode(self) -> str:
        """Attention mode for teacher-forced training: sample for hard, expectation for soft."""
        return "sample" if self.stochastic else "expectation"

    def forward(self, images: torch.Tensor, captions: torch.Tensor, mode: str | None = None,
                mix: torch.Tensor | None = None, feats: torch.Tensor | None = None,
                noise: torch.Tensor | None = None, repeats: int = 1) -> CaptionerOutput:
        """Teacher forcing: captions (B, T+1) = <start> w… <end> <pad>…; predicts captions[:, 1:].

        Outputs at padded target positions are zeros (the losses mask them). ``noise`` (B, T):
        uniform draws that fix the sampled hard-attention locations (drawn if None).
        ``repeats``: captions hold ``repeats`` rows per image, image-major (self-critical
        samples); the attention memory is computed once per image and its rows repeated.
        """
        mode = mode or self.default_mode()
        if feats is None:
            feats = self.encode(images)  # (B, L, D)
        lengths = (captions[:, 1:] != PAD_ID).sum(1)  # (B,) real target tokens
        mem = repeat_rows(self.memory(feats), repeats)
        state = repeat_rows(self.decoder.init_state(feats), repeats)
        out = self.decoder.teacher_forced(mem, state, captions[:, :-1], lengths, mode, mix, noise)
        return CaptionerOutput(*out)

    def forward_stepwise(self, images: torch.Tensor, captions: torch.Tensor,
                         mode: str | None = None, mix: torch.Tensor | None = None,
                         feats: torch.Tensor | None = None,
                         noise: torch.Tensor | None = None) -> CaptionerOutput:
        """Reference teacher forcing: one full ``decoder.step`` per position, padding included.

        The same computation as :meth:`forward` written the slow, obvious way; the tests hold the
        fast path to it (losses and gradients on the real positions).
        """
        mode = mode or self.default_mode()
        if feats is None:
            feats = self.encode(images)  # (B, L, D)
        mem = self.memory(feats)
        state = self.decoder.init_state(feats)
        b, t_in = captions.shape[0], captions.shape[1] - 1
        if noise is None and mode == "sample":
            noise = torch.rand(b, t_in, device=captions.device)
        logits, alphas, betas, logps, ents = [], [], [], [], []
        for t in range(t_in):
            out = self.decoder.step(mem, state, captions[:, t], mode, mix,
                                    noise[:, t] if noise is not None else None)
            state = out.state
            logits.append(out.logits)  # (B, V)
            alphas.append(out.attn.alpha)  # (B, L)
            betas.append(out.beta)
            logps.append(out.attn.log_prob)
            ents.append(out.attn.entropy)
        every = torch.stack(torch.meshgrid(torch.arange(b), torch.arange(t_in), indexing="ij"),
                            -1).reshape(-1, 2).to(captions.device)  # (B·T, 2): padding included
        return CaptionerOutput(torch.stack(logits, 1).reshape(b * t_in, -1), torch.stack(alphas, 1),
                               torch.stack(betas, 1), torch.stack(logps, 1), torch.stack(ents, 1),
                               every)
