"""Attention for a caption a person writes: each word fed to the model (teacher forcing), its map,
gate, log p, rank and the model's top words at that step.

The words go through the same :meth:`Decoder.step` as greedy and beam search, with the same
packed weights and the same test-time attention mode, so explaining the model's own greedy
caption reproduces its maps and its score. All texts of a batch of images are one batched pass:
each image's attention memory is computed once, its texts are its rows (as an image's beams are
in beam search), and the step loop runs to the longest text.

Scores are the model's raw log-probabilities, ``<end>`` included: the decoding rules (no
``<unk>``, no repeated word pair) choose which words the model says, they do not renormalise the
distribution, so a text that breaks them (a repeated pair, an unknown word fed as ``<unk>``) is
scored as the model scores it. Ranks count the words the model may generate at all (every word
but ``<pad>`` and ``<start>``); the top words are those decoding could choose (``<unk>`` left out
unless ``eval.allow_unk``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from showattend.decoding import _test_mode, applicable_mode, packed_weights
from showattend.models.attention import repeat_rows
from showattend.vocab import END_ID, PAD_ID, START_ID, UNK_ID, Vocab, tokenize

__all__ = ["ExplainError", "Text", "Forced", "encode_text", "teacher_force", "TOP_K"]

TOP_K = 3  # the model's top words reported per step


class ExplainError(ValueError):
    """A text that cannot be explained (no word in it)."""


@dataclass(frozen=True)
class Text:
    """A text as the model reads it: its words, their ids (unknown words → ``<unk>``)."""

    text: str
    words: list[str]
    ids: list[int]
    unknown: list[str]  # the words not in the vocabulary, in order (fed as <unk>)


def encode_text(vocab: Vocab, text: str) -> Text:
    """Tokenise ``text`` with the model's own tokenizer; every word is kept, however long."""
    words = tokenize(text)
    if not words:
        raise ExplainError(f"text {text!r} has no word to explain")
    ids = [vocab.stoi.get(w, UNK_ID) for w in words]
    unknown = [w for w, i in zip(words, ids) if i == UNK_ID and w != "<unk>"]
    return Text(text, words, ids, unknown)


class Forced(NamedTuple):
    """Per row (an image's text) and step t = 0 … n (word t, then <end> at t = n):"""

    logp: torch.Tensor  # (R, S) log p of the fed token (0 past the row's <end>)
    rank: torch.Tensor  # (R, S) its rank among the words the model can emit (1 = top)
    top_ids: torch.Tensor  # (R, S, K) the model's top words at that step
    top_logp: torch.Tensor  # (R, S, K)
    alphas: torch.Tensor  # (R, S, L) the map of the step that predicted the token
    betas: torch.Tensor  # (R, S)
    locations: torch.Tensor  # (R, S) the cell the attention mode chose
    aux: dict[str, torch.Tensor] | None  # (R, S, ...) per-step extras (heads, windows)


def _rows(texts: list[list[Text]], device: torch.device) -> tuple[torch.Tensor, int]:
    """(R, S+1) token rows <start> w… <end> <pad>…, g rows per image (images with fewer texts
    padded with a one-word dummy, dropped by the caller)."""
    g = max(len(t) for t in texts)
    longest = max(len(x.ids) for ts in texts for x in ts)
    rows = torch.full((len(texts) * g, longest + 2), PAD_ID, dtype=torch.long)
    for i, ts in enumerate(texts):
        for j in range(g):
            ids = ts[j].ids if j < len(ts) else [UNK_ID]
            rows[i * g + j, 0] = START_ID
            rows[i * g + j, 1:len(ids) + 1] = torch.tensor(ids)
            rows[i * g + j, len(ids) + 1] = END_ID
    return rows.to(device), g


@torch.no_grad()
@packed_weights
def teacher_force(model, feats: torch.Tensor, texts: list[list[Text]], mode: str | None = None,
                  allow_unk: bool = False) -> tuple[Forced, int]:
    """Feed ``texts[i]`` (the texts of image i) word by word to the model on annotations
    ``feats`` (B, L, D). Returns the per-step outputs of the B·g rows (row i·g + j = text j of
    image i) and g."""
    mode = applicable_mode(model, mode) or _test_mode(model)
    rows, g = _rows(texts, feats.device)
    mem = model.memory(feats)
    if not getattr(model.decoder.attention, "shares_memory", False):
        mem = repeat_rows(mem, g)
    state = repeat_rows(model.decoder.init_state(feats), g)
    n_steps = rows.shape[1] - 1
    logps, ranks, top_i, top_v, alphas, betas, locs, aux = [], [], [], [], [], [], [], []
    for t in range(n_steps):
        out = model.decoder.step(mem, state, rows[:, t], mode)
        logp = torch.log_softmax(out.logits.float(), -1)  # (R, V)
        target = rows[:, t + 1]  # (R,)
        lp = logp.gather(1, target.unsqueeze(1)).squeeze(1)  # (R,)
        able = logp.clone()
        able[:, PAD_ID] = able[:, START_ID] = float("-inf")  # never emitted
        ranks.append((able > lp.unsqueeze(1)).sum(1) + 1)
        if not allow_unk:
            able[:, UNK_ID] = float("-inf")
        v, i = able.topk(TOP_K, dim=1)
        live = target != PAD_ID
        logps.append(torch.where(live, lp, torch.zeros_like(lp)))
        top_i.append(i)
        top_v.append(v)
        alphas.append(out.attn.alpha)
        betas.append(out.beta)
        locs.append(out.attn.location)
        aux.append(out.attn.aux)
        state = out.state
    stacked_aux = ({k: torch.stack([a[k] for a in aux], 1) for k in aux[0]}
                   if aux and aux[0] else None)
    return Forced(torch.stack(logps, 1), torch.stack(ranks, 1), torch.stack(top_i, 1),
                  torch.stack(top_v, 1), torch.stack(alphas, 1), torch.stack(betas, 1),
                  torch.stack(locs, 1), stacked_aux), g


def gather_texts(texts: list[str], texts_file: str | None, references: str | None):
    """The texts to explain per image, from ``--text`` (each), ``--texts`` (a file, one a line)
    and ``--references`` (each image's reference captions, matched by file name). Returns
    (texts_for(path) → [text], the references read or None). Every text must hold a word."""
    from pathlib import Path

    shared = list(texts)
    if texts_file:
        raw = Path(texts_file).read_text(encoding="utf-8", errors="replace")
        lines = [ln.strip() for ln in raw.splitlines() if ln.strip()]
        if not lines:
            raise ExplainError(f"--texts {texts_file}: no caption in it")
        shared.extend(lines)
    refs = None
    if references:
        from showattend.report.references import read_references

        refs = read_references(references)
    if not shared and refs is None:
        raise ExplainError("give a caption to explain: --text, --texts FILE or --references FILE")
    for t in shared:
        if not tokenize(t):
            raise ExplainError(f"text {t!r} has no word to explain")

    def texts_for(path) -> list[str]:
        own = [t for t in (refs or {}).get(Path(path).name, []) if tokenize(t)]
        return shared + own

    return texts_for, refs


def unknown_line(words: list[str]) -> str:
    """One line naming the words fed as <unk> (each once, in order of first use)."""
    seen = list(dict.fromkeys(words))
    shown = ", ".join(seen[:12]) + (f", … ({len(seen)} in all)" if len(seen) > 12 else "")
    return (f"{len(words)} word{'s' if len(words) != 1 else ''} not in the model's vocabulary, "
            f"fed as <unk> and marked in the records: {shown}")


@torch.no_grad()
def forced_references(model, source, vocab: Vocab, device: torch.device, batch_size: int = 100,
                      precision: str = "fp32", mode: str | None = None,
                      allow_unk: bool = False) -> list[dict]:
    """Every reference caption of every good image of ``source`` (a split), teacher forced: one
    dict per caption (index, image_id, caption, words, alphas (n, h, w)) — the generated
    captions' result format, so the photo-grounding measures score them unchanged (Liu et al.'s
    protocol: where the model looks for the words people said)."""
    from torch.utils.data import DataLoader

    from showattend import runtime
    from showattend.data.datasets import ImageDataset, collate_images

    model.eval()
    gh, gw = model.grid
    loader = DataLoader(ImageDataset(source), batch_size=batch_size, shuffle=False,
                        collate_fn=collate_images)
    results = []
    for imgs, idxs, _ in loader:
        if imgs is None:
            continue
        texts = [[encode_text(vocab, c) for c in source.records[i].captions if tokenize(c)]
                 for i in idxs]
        keep = [j for j, t in enumerate(texts) if t]
        if not keep:
            continue
        imgs = imgs[keep].to(device)
        with runtime.autocast(precision, device):
            feats = imgs if getattr(source, "features", False) else model.encode(imgs)
            forced, g = teacher_force(model, feats, [texts[j] for j in keep], mode, allow_unk)
        for b, j in enumerate(keep):
            i = idxs[j]
            for k, t in enumerate(texts[j]):
                r, n = b * g + k, len(t.words)
                results.append({"index": i, "image_id": source.records[i].image_id,
                                "caption": " ".join(t.words), "words": t.words,
                                "alphas": forced.alphas[r, :n].reshape(n, gh, gw).float()
                                .cpu().numpy()})
    return results
