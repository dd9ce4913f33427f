"""An ensemble of decoders over one frozen encoder: decoding averages their word distributions.

N decoders trained from different seeds on the same annotations (same vocabulary, grid and
preprocessing) decode as one: at each step every member runs its own attention and LSTM on its
own state, and the next-word distribution is the mean of the members' probabilities,

    p(w | ·) = (1/N) Σ_i p_i(w | ·),

returned as log p so that decoding's log-softmax leaves it unchanged. The attention map reported
for a word is the mean of the members' maps — a distribution over the same cells, scored against
the boxes like any other map — and the gate value the mean of theirs.

The ensemble keeps decoding's interface (decoding.py, unchanged in its logic): its memory is one
flat tuple of the members' memory tensors and its state stacks the members' h and c along the
hidden axis, so the beam search's row indexing (reorder, drop finished images) applies to every
member at once. Decoding only: an ensemble is assembled from trained checkpoints
(``showattend ensemble``) and never trained as one.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from showattend.models.attention import AttentionOutput, Memory
from showattend.models.decoder import Decoder, State, StepOutput


class EnsembleMemory(tuple):
    """The members' Memory tensors, flattened; rebuilt with ``type(mem)(*tensors)`` as decoding
    does for a Memory."""

    def __new__(cls, *tensors: torch.Tensor):
        return super().__new__(cls, tensors)


class _Attention:
    """What the captioner and decoding read from ``decoder.attention``: the members' (equal)
    grid and kind, and the memory built from each member's projections."""

    def __init__(self, members: nn.ModuleList):
        self._members = members
        first = members[0].attention
        self.grid = first.grid
        self.kind = first.kind
        self.mode_label = f"an ensemble's {first.kind}"  # decoding.applicable_mode's line
        self.window = int(getattr(first, "window", 1))
        self.shares_memory = bool(getattr(first, "shares_memory", False))
        self.stochastic = False
        self.needs_pixels = False

    def precompute(self, feats: torch.Tensor) -> EnsembleMemory:
        return EnsembleMemory(*(x for m in self._members for x in m.attention.precompute(feats)))


class EnsembleDecoder(nn.Module):
    """N soft-attention decoders decoding as one (the mean of their word distributions)."""

    def __init__(self, members: list[Decoder]):
        super().__init__()
        if len(members) < 2:
            raise ValueError("an ensemble needs at least 2 decoders")
        kinds = {(m.attention.kind, tuple(m.attention.grid), m.vocab_size) for m in members}
        if len(kinds) != 1:
            raise ValueError(f"ensemble members differ in attention kind, grid or vocabulary: "
                             f"{sorted(kinds)}")
        if any(getattr(m.attention, "stochastic", False) or
               getattr(m.attention, "needs_pixels", False) for m in members):
            raise ValueError("ensembles are built from deterministic attention (soft and its "
                             "variants), not from sampled locations or glimpses")
        self.members = nn.ModuleList(members)
        self.vocab_size = members[0].vocab_size
        self._hidden = [m.lstm.hidden_size for m in members]
        self._n_mem = len(Memory._fields)
        self.__dict__["attention"] = _Attention(self.members)  # not a submodule: no weights

    def _split_state(self, state: State) -> list[State]:
        hs = state.h.split(self._hidden, 1)
        cs = state.c.split(self._hidden, 1)
        return [State(h, c) for h, c in zip(hs, cs)]

    def _split_memory(self, mem: EnsembleMemory) -> list[Memory]:
        k = self._n_mem
        return [Memory(*mem[i * k:(i + 1) * k]) for i in range(len(self.members))]

    def init_state(self, feats: torch.Tensor) -> State:
        states = [m.init_state(feats) for m in self.members]
        return State(torch.cat([s.h for s in states], 1), torch.cat([s.c for s in states], 1))

    def step(self, mem: EnsembleMemory, state: State, prev: torch.Tensor, mode: str,
             mix: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> StepOutput:
        """One word for every member; log of the mean of their distributions (B, V)."""
        outs = [m.step(mm, s, prev, mode) for m, mm, s in
                zip(self.members, self._split_memory(mem), self._split_state(state))]
        logp = torch.stack([torch.log_softmax(o.logits.float(), -1) for o in outs])  # (N, B, V)
        mixed = torch.logsumexp(logp, 0) - math.log(len(outs))  # (B, V)
        alpha = torch.stack([o.attn.alpha for o in outs]).mean(0)  # (B, L)
        ent = -(alpha * alpha.clamp_min(1e-12).log()).sum(-1)
        attn = AttentionOutput(torch.stack([o.attn.context for o in outs]).mean(0), alpha,
                               torch.zeros_like(ent), ent, alpha.argmax(-1))
        new = State(torch.cat([o.state.h for o in outs], 1), torch.cat([o.state.c for o in outs], 1))
        return StepOutput(mixed, new, attn, torch.stack([o.beta for o in outs]).mean(0))

    def teacher_forced(self, *args, **kwargs):
        raise RuntimeError("an ensemble decodes only; train its members one by one")
