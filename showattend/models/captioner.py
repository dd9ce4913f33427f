"""The full model: encoder + attention + decoder, and its construction from a Config."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from showattend.models.attention import HardAttention, Memory, SoftAttention, build_score
from showattend.models.decoder import Decoder
from showattend.models.encoder import Encoder, build_encoder
from showattend.vocab import PAD_ID


class CaptionerOutput(NamedTuple):
    """Teacher-forced outputs, time-major within each sample (never reordered)."""

    logits: torch.Tensor  # (B, T, V)
    alphas: torch.Tensor  # (B, T, L)
    betas: torch.Tensor  # (B, T)
    log_probs: torch.Tensor  # (B, T) log p(s_t) of sampled locations (hard), zeros otherwise
    entropies: torch.Tensor  # (B, T) attention entropy per step


class Captioner(nn.Module):
    """Show, Attend and Tell captioner."""

    def __init__(self, encoder: Encoder, decoder: Decoder, test_mode: str = "expectation"):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.test_mode = test_mode  # attention mode used by decoding (hard: argmax/sample/...)

    @property
    def grid(self) -> tuple[int, int]:
        return self.decoder.attention.grid

    @property
    def attention_kind(self) -> str:
        return self.decoder.attention.kind

    @classmethod
    def from_config(cls, cfg, vocab_size: int) -> Captioner:
        """Map a Config to explicit constructor arguments (tests build models without configs)."""
        enc = build_encoder(cfg.encoder.backbone, cfg.encoder.weights, cfg.encoder.grid,
                            cfg.encoder.channels, cfg.encoder.coords, cfg.encoder.fine_tune_blocks)
        return cls.build(enc, vocab_size, attention=cfg.attention.kind, score=cfg.attention.score,
                         attn_dim=cfg.attention.dim, window=cfg.attention.window,
                         mc_samples=cfg.attention.mc_samples, embed_dim=cfg.decoder.embed_dim,
                         hidden_dim=cfg.decoder.hidden_dim, dropout=cfg.decoder.dropout,
                         beta=cfg.decoder.beta, deep_output=cfg.decoder.deep_output,
                         test_mode=cfg.attention.test_mode)

    @classmethod
    def build(cls, encoder: Encoder, vocab_size: int, attention: str = "soft",
              score: str = "additive", attn_dim: int = 128, window: int = 1, mc_samples: int = 8,
              embed_dim: int = 64, hidden_dim: int = 256, dropout: float = 0.3,
              beta: str = "scalar", deep_output: bool = True,
              test_mode: str = "argmax") -> Captioner:
        """Assemble a captioner around ``encoder``."""
        grid = (encoder.grid, encoder.grid)
        sc = build_score(score, encoder.out_dim, hidden_dim, attn_dim)
        if attention == "soft":
            attn: nn.Module = SoftAttention(sc, grid)
        elif attention == "hard":
            attn = HardAttention(sc, grid, window=window, mc_samples=mc_samples)
        else:
            raise ValueError(f"unknown attention kind {attention!r}")
        dec = Decoder(vocab_size, encoder.out_dim, attn, embed_dim, hidden_dim, dropout, beta,
                      deep_output)
        return cls(encoder, dec, test_mode if attention == "hard" else "expectation")

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) → annotations (B, L, D)."""
        return self.encoder(images)

    def memory(self, feats: torch.Tensor) -> Memory:
        """Per-image attention memory (projections computed once)."""
        return self.decoder.attention.precompute(feats)

    def default_mode(self) -> str:
        """Attention mode for teacher-forced training: sample for hard, expectation for soft."""
        return "sample" if self.attention_kind == "hard" else "expectation"

    def forward(self, images: torch.Tensor, captions: torch.Tensor, mode: str | None = None,
                mix: torch.Tensor | None = None, feats: torch.Tensor | None = None,
                noise: torch.Tensor | None = None) -> CaptionerOutput:
        """Teacher forcing: captions (B, T+1) = <start> w… <end> <pad>…; predicts captions[:, 1:].

        Outputs at padded target positions are zeros (the losses mask them). ``noise`` (B, T):
        uniform draws that fix the sampled hard-attention locations (drawn if None).
        """
        mode = mode or self.default_mode()
        if feats is None:
            feats = self.encode(images)  # (B, L, D)
        lengths = (captions[:, 1:] != PAD_ID).sum(1)  # (B,) real target tokens
        out = self.decoder.teacher_forced(self.memory(feats), self.decoder.init_state(feats),
                                          captions[:, :-1], lengths, mode, mix, noise)
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
        return CaptionerOutput(torch.stack(logits, 1), torch.stack(alphas, 1), torch.stack(betas, 1),
                               torch.stack(logps, 1), torch.stack(ents, 1))
