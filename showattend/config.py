"""Run configuration: nested frozen dataclasses, loaded from TOML, with dotted overrides.

Unknown keys are an error (a typo in a config must never silently fall back to a default), and
values are type-checked against the dataclass field types so ``--train.lr=abc`` fails clearly.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration file or override is invalid (one-line message)."""


@dataclass(frozen=True)
class DataConfig:
    """Where the captions and images come from and how captions become token ids."""

    kind: str = "shapes"  # "shapes" (built-in) | "coco" (official json) | "karpathy" | "flickr"
    root: str = "runs/data/shapes"  # shapes: output dir; coco/karpathy/flickr: image root
    train_annotations: str = ""  # coco: captions_train2014.json
    val_annotations: str = ""  # coco: captions_val2014.json
    test_annotations: str = ""  # coco: separate test file; without it val is split in two halves
    # coco with one captions file (train_annotations alone): its images' train/val/test shares,
    # drawn with data.seed; 80/10/10 as Karpathy's splits roughly do
    split: str = "0.8,0.1,0.1"
    split_file: str = ""  # karpathy: dataset_coco.json / dataset_flickr8k.json / ...
    flickr_captions: str = ""  # flickr: the token file (Flickr8k.token.txt), NAME#K<TAB>caption
    flickr_splits: str = ""  # flickr: folder of the split lists (Flickr_8k.trainImages.txt, ...)
    prepared: str = ""  # prepared data folder: `prepare` writes it; train/evaluate then read it
    features: str = "auto"  # prepared + frozen encoder: "auto" reads the feature cache | "off"
    min_image_side: int = 32  # prepare: images with a shorter side are skipped as too small
    objects: str = ""  # optional objects file for grounding ({split} is substituted)
    entities: str = ""  # Flickr30k Entities (annotations.zip or its folder): photo grounding
    n_train: int = 6000
    n_val: int = 500
    n_test: int = 500
    seed: int = 0
    min_word_freq: int = 1
    max_len: int = 20
    cache_in_memory: bool = True
    num_workers: int = 0
    max_images: int = 0  # >0 keeps only the first N images of every split (quick experiments)
    on_bad_image: str = "skip"  # "skip" (count and report) | "error"


@dataclass(frozen=True)
class EncoderConfig:
    """CNN backbone producing the grid of annotation vectors."""

    # shapes_cnn | resnet50/101/152 | vgg16/19 | efficientnet_lite0/1/2 (models/backbones.py)
    backbone: str = "shapes_cnn"
    weights: str = "none"  # "imagenet" | "none" | path to a local state-dict file
    grid: int = 8  # annotation grid is grid × grid (adaptive pooling)
    image_size: int = 64  # input images are resized to image_size × image_size
    resize: str = "stretch"  # "stretch" | "crop"
    channels: int = 128  # shapes_cnn width (last stage)
    coords: bool = True  # append 2 coordinate channels (x, y in [-1, 1]) to every annotation
    fine_tune_blocks: int = 0  # pretrained backbones: number of last blocks trained (0 = frozen)
    # Transformer encoder layers over the annotation grid (0 = none). They run after the CNN (and
    # after a feature cache), on the decoder side, so they train even when the CNN is frozen.
    self_attention_layers: int = 0
    self_attention_heads: int = 4  # heads of those layers
    self_attention_dim: int = 128  # their width (annotations are projected in and back out)


@dataclass(frozen=True)
class AttentionConfig:
    """Attention mechanism: soft, hard, local, or a glimpse on the image's pixels."""

    # soft | hard | local | glimpse_hard | glimpse_gaussian | glimpse_stn (models/kinds.py)
    kind: str = "soft"
    score: str = "additive"  # additive | general | scaled_dot | cosine
    dim: int = 128  # attention MLP / projection width
    window: int = 1  # hard: crop size k (odd); k=1 is the paper's hard attention
    test_mode: str = "argmax"  # hard at test time: expectation | argmax | sample | mc
    mc_samples: int = 8  # hard, test_mode "mc": samples averaged per step
    heads: int = 1  # soft and local: heads with their own projections (1 = the paper's single map)
    local_window: int = 5  # local: side of the square window of cells around the predicted centre
    local_sigma: float = 0.0  # local: σ of the distance Gaussian in cells (0 = Luong: half-width/2)
    glimpse_size: int = 16  # glimpse_*: side in pixels of the glimpse the glimpse network encodes


@dataclass(frozen=True)
class DecoderConfig:
    """LSTM decoder with deep output layer."""

    embed_dim: int = 64
    hidden_dim: int = 256
    dropout: float = 0.3
    beta: str = "scalar"  # gating scalar β: "none" | "scalar" | "channel"
    deep_output: bool = True
    # decoders decoding as one (models/ensemble.py); written by `showattend ensemble`, never trained
    ensemble: int = 1


@dataclass(frozen=True)
class HardConfig:
    """REINFORCE terms for hard attention (units documented in losses.py)."""

    lambda_r: float = 0.01  # weight of the score-function term (reward summed over words)
    lambda_e: float = 3e-5  # entropy bonus per step
    baseline_decay: float = 0.9  # b ← decay·b + (1−decay)·mean(r)
    mix_prob: float = 0.5  # probability of using the expected (soft) context
    mix_mode: str = "batch"  # "batch" | "sample" | "off"
    n_samples: int = 1  # location samples per caption (the baseline "loo" needs >= 2)
    baseline: str = "moving"  # "moving": average of past rewards | "loo": mean of the caption's
    #   other n_samples − 1 location samples (leave-one-out, no state)
    reward: str = "caption"  # "caption": log p of the whole caption for every location |
    #   "to_go": location t gets log p of words t… (needs baseline "loo": per-word baselines)
    warm_start: str = ""  # soft checkpoint to initialise from


@dataclass(frozen=True)
class SupervisionConfig:
    """Attention supervision from human boxes (data.entities): an objective of its own, off by
    default. A caption word that names a boxed phrase of its photo pulls its map to the boxes."""

    weight: float = 0.0  # 0 = off; else the weight of the term beside the cross-entropy
    loss: str = "mass"  # "mass": −log(mass on the boxes) | "ce": cross-entropy to the boxes' share


@dataclass(frozen=True)
class ScstConfig:
    """Self-critical sequence training (``train.objective = "scst"``): CIDEr-D of sampled
    captions minus a baseline, fine-tuning a cross-entropy checkpoint (``train.init``)."""

    samples: int = 5  # captions drawn per image (K)
    baseline: str = "mean"  # "mean": of the image's other K−1 samples | "greedy": greedy caption
    end_token: bool = False  # the reward counts <end> as a word of samples and references alike,
    #   so a caption that stops mid-phrase ("a man is sitting on a") loses the n-grams that end it


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, schedule, checkpointing."""

    epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-3
    encoder_lr: float = 0.0  # 0 = same as lr (only for trainable encoder parameters)
    weight_decay: float = 0.0
    label_smoothing: float = 0.0  # ε: word targets (1 − ε)·one-hot + ε/V, cross-entropy only
    grad_clip: float = 5.0  # max gradient norm (0 = no clipping)
    alpha_c: float = 1.0  # λ of the doubly stochastic penalty
    lr_decay: float = 0.5  # factor on plateau of the validation metric
    lr_patience: int = 2  # epochs without improvement before decaying
    # "plateau": lr × lr_decay^(plateau decays); "cosine": every step, from lr down to
    # lr × lr_final at the end of train.epochs (half a cosine; plateau decays then do not apply)
    lr_schedule: str = "plateau"
    lr_final: float = 0.0
    early_stop: int = 6  # epochs without improvement before stopping (0 = never)
    val_metric: str = "BLEU-4"  # "BLEU-4" | "CIDEr" (free-running decoding, never teacher forced)
    val_beam: int = 1
    val_images: int = 0  # >0: validate on the first N val images only
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    # "fp32" | "bf16" | "auto" (bf16 where the device has fast bf16: precision.py), for training,
    # its validation and `prepare`'s feature cache; the resolved choice is saved in the run
    precision: str = "fp32"
    deterministic: bool = False
    nan_policy: str = "stop"  # "stop" | "skip"
    log_every: int = 50
    threads: int = 0  # torch threads on CPU (0 = torch default)
    # decoder.ensemble > 1: members trained at once, each in its own process, the threads split
    # between them (small recurrent steps use two cores poorly: two 1-thread runs side by side
    # took 1.2x the steps of one 2-thread run on the README's machine)
    member_jobs: int = 1
    # K > 1: the run also keeps the model of every epoch (epoch<k>.pt, weights only), and an
    # ensemble (decoder.ensemble > 1) joins each member's best epoch with its K − 1 epochs before
    # it: a snapshot ensemble at no extra training time (README, "Ensembles")
    snapshots: int = 1
    objective: str = "auto"  # "auto": the model's (cross-entropy / REINFORCE) | "scst"
    init: str = ""  # checkpoint whose weights start a new run (vocabulary and images checked)


@dataclass(frozen=True)
class EvalConfig:
    """Decoding and metrics at evaluation time."""

    beam: int = 3
    max_len: int = 20
    length_norm: float = 0.0  # score / length**length_norm when ranking finished beams
    no_repeat_ngram: int = 0  # > 1: never repeat an n-gram within a caption (0 = off)
    allow_unk: bool = False  # False: the unknown word <unk> is never generated
    precision: str = "fp32"  # evaluate/caption/inspect/serve: "fp32" | "bf16" | "auto"
    meteor: bool = True
    batch_size: int = 100


@dataclass(frozen=True)
class Config:
    """A whole run."""

    name: str = "run"
    out_dir: str = "runs/run"
    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    hard: HardConfig = field(default_factory=HardConfig)
    supervision: SupervisionConfig = field(default_factory=SupervisionConfig)
    scst: ScstConfig = field(default_factory=ScstConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _check_type(value: Any, tp: Any, where: str) -> Any:
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if type(value) is not tp:
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: dict[str, Any], where: str = "config") -> Any:
    """Build dataclass ``cls`` from a (nested) dict; unknown keys and bad types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key {where}.{unknown[0]} (known: {', '.join(sorted(names))})"
                          .replace("config.", "", 1))
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        sub = f"{where}.{name}"
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value, sub)
        else:
            kwargs[name] = _check_type(value, tp, sub.replace("config.", "", 1))
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (TOML/JSON-able) of a config dataclass."""
    return dataclasses.asdict(cfg)


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare string such as --encoder.backbone=resnet101


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (leading dashes allowed) to a nested dict copy."""
    out = _deepcopy(data)
    for item in overrides:
        item = item.lstrip("-")
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, text = item.split("=", 1)
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {part} is not a section")
        node[parts[-1]] = _parse_value(text)
    return out


def _deepcopy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deepcopy(v) if isinstance(v, dict) else v for k, v in d.items()}


def builtin_config_dir() -> Path:
    """Where the built-in run configs live: the package's ``configs/`` (shipped in the wheel; in a
    source checkout a symlink to the top-level ``configs/``)."""
    return Path(__file__).parent / "configs"


def builtin_configs() -> list[str]:
    """Names of the built-in configs (``demo``, ``coco_soft``, ...), sorted."""
    return sorted(p.stem for p in builtin_config_dir().glob("*.toml"))


def resolve_config(name_or_path: str | Path) -> Path:
    """The TOML file meant by ``--config``: a file that exists wins; otherwise a bare name
    (``demo``, ``flickr8k_soft``, ``demo.toml``) is looked up among the built-in configs.
    Anything else is a one-line :class:`ConfigError` listing the built-in names."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    text = str(name_or_path)
    if "/" not in text and "\\" not in text:  # a bare name, not a path
        builtin = builtin_config_dir() / (text if text.endswith(".toml") else f"{text}.toml")
        if builtin.is_file():
            return builtin
    names = ", ".join(builtin_configs()) or "none installed"
    what = "is not a file" if p.exists() else "not found"
    raise ConfigError(f"config file {what}: {p} (nor a built-in config name: {names})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a TOML config (or the defaults when ``path`` is None) and apply dotted overrides.

    ``path`` is a file, or the name of a built-in config (see :func:`resolve_config`).
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = resolve_config(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot parse config {p}: {exc}") from None
    data = apply_overrides(data, overrides or [])
    cfg = from_dict(Config, data)
    validate(cfg)
    return cfg


_CHOICES = {
    ("data", "kind"): ("shapes", "coco", "karpathy", "flickr"),
    ("data", "features"): ("auto", "off"),
    ("data", "on_bad_image"): ("skip", "error"),
    ("encoder", "resize"): ("stretch", "crop"),
    ("attention", "kind"): ("soft", "hard", "local", "glimpse_hard", "glimpse_gaussian",
                            "glimpse_stn"),
    ("attention", "score"): ("additive", "general", "scaled_dot", "cosine"),
    ("attention", "test_mode"): ("expectation", "argmax", "sample", "mc"),
    ("decoder", "beta"): ("none", "scalar", "channel"),
    ("hard", "mix_mode"): ("batch", "sample", "off"),
    ("hard", "baseline"): ("moving", "loo"),
    ("hard", "reward"): ("caption", "to_go"),
    ("train", "val_metric"): ("BLEU-4", "CIDEr"),
    ("train", "nan_policy"): ("stop", "skip"),
    ("train", "precision"): ("auto", "fp32", "bf16"),
    ("eval", "precision"): ("auto", "fp32", "bf16"),
    ("train", "lr_schedule"): ("plateau", "cosine"),
    ("supervision", "loss"): ("mass", "ce"),
    ("train", "objective"): ("auto", "scst"),
    ("scst", "baseline"): ("mean", "greedy"),
}


def validate(cfg: Config) -> None:
    """Check value ranges and enumerations; raise ConfigError with the offending key."""
    for (section, key), choices in _CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in choices:
            raise ConfigError(f"{section}.{key} = {value!r}: must be one of {', '.join(choices)}")
    positive = [("train", "epochs"), ("train", "batch_size"), ("encoder", "grid"),
                ("encoder", "image_size"), ("decoder", "hidden_dim"), ("decoder", "embed_dim"),
                ("attention", "dim"), ("eval", "beam"), ("eval", "max_len"), ("data", "max_len"),
                ("hard", "n_samples"), ("attention", "mc_samples"), ("train", "val_beam"),
                ("train", "member_jobs"), ("train", "snapshots")]
    # Zero here would crash deep inside a run (modulo by zero, an empty DataLoader batch, a
    # zero-width convolution) instead of failing at load time with the key's name.
    positive += [("train", "log_every"), ("eval", "batch_size"), ("encoder", "channels")]
    for section, key in positive:
        if getattr(getattr(cfg, section), key) <= 0:
            raise ConfigError(f"{section}.{key} must be > 0")
    # Negative counts are rejected by the data generator / DataLoader / optimiser with a traceback,
    # or silently slice records away (max_images = -2 drops the last two images of every split).
    non_negative = [("data", "n_train"), ("data", "n_val"), ("data", "n_test"), ("data", "seed"),
                    ("data", "max_images"), ("data", "num_workers"), ("train", "val_images"),
                    ("train", "weight_decay"), ("train", "encoder_lr"), ("train", "grad_clip"),
                    ("train", "early_stop"), ("encoder", "fine_tune_blocks"),
                    ("eval", "no_repeat_ngram"), ("data", "min_image_side"),
                    ("supervision", "weight")]
    for section, key in non_negative:
        if getattr(getattr(cfg, section), key) < 0:
            raise ConfigError(f"{section}.{key} must be >= 0")
    _check_label_smoothing(cfg)
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(sub):
            continue
        for f in dataclasses.fields(sub):
            value = getattr(sub, f.name)
            if isinstance(value, float) and math.isnan(value):
                raise ConfigError(f"{section.name}.{f.name} is NaN")
    if cfg.attention.window < 1 or cfg.attention.window % 2 != 1:
        raise ConfigError("attention.window must be a positive odd number (the crop is centred "
                          "on the sampled cell)")
    _validate_attention_family(cfg)
    if not 0.0 <= cfg.decoder.dropout < 1.0:
        raise ConfigError("decoder.dropout must be in [0, 1)")
    if cfg.decoder.ensemble < 1:
        raise ConfigError("decoder.ensemble must be >= 1 (the number of decoders decoding as one)")
    if not 0.0 <= cfg.hard.baseline_decay < 1.0:
        raise ConfigError("hard.baseline_decay must be in [0, 1)")
    if cfg.hard.lambda_r < 0 or cfg.hard.lambda_e < 0 or cfg.train.alpha_c < 0:
        raise ConfigError("hard.lambda_r, hard.lambda_e and train.alpha_c must be >= 0")
    if not 0.0 <= cfg.hard.mix_prob <= 1.0:
        raise ConfigError("hard.mix_prob must be in [0, 1]")
    if cfg.hard.baseline == "loo" and cfg.hard.n_samples < 2:
        raise ConfigError("hard.baseline = \"loo\" needs hard.n_samples >= 2 (each sample's "
                          "baseline is the mean of the caption's other samples)")
    if cfg.hard.reward == "to_go" and cfg.hard.baseline != "loo":
        raise ConfigError("hard.reward = \"to_go\" needs hard.baseline = \"loo\" (a baseline "
                          "per word: one moving average cannot follow the reward's length)")
    if cfg.eval.no_repeat_ngram == 1:
        raise ConfigError("eval.no_repeat_ngram = 1 would forbid repeating any word; use 0 (off) "
                          "or n >= 2")
    if cfg.train.objective == "scst" and cfg.scst.samples < (2 if cfg.scst.baseline == "mean"
                                                             else 1):
        raise ConfigError("scst.samples must be >= 2 with the mean-of-others baseline (>= 1 "
                          "with scst.baseline = \"greedy\")")
    if not 0.0 <= cfg.train.lr_final <= 1.0:
        raise ConfigError("train.lr_final must be in [0, 1] (a fraction of train.lr)")
    if not 0 < cfg.train.lr < math.inf:
        raise ConfigError("train.lr must be a finite number > 0")


def _validate_attention_family(cfg: Config) -> None:
    """Keys of the local / multi-head / self-attention / glimpse variants (models/kinds.py)."""
    a, e = cfg.attention, cfg.encoder
    if a.heads < 1:
        raise ConfigError("attention.heads must be >= 1")
    if a.heads > 1 and a.kind not in ("soft", "local"):
        raise ConfigError(f"attention.heads = {a.heads}: several heads exist for soft and local "
                          f"attention only, not {a.kind}")
    if a.dim % a.heads:
        raise ConfigError(f"attention.dim = {a.dim} must be divisible by attention.heads = "
                          f"{a.heads} (each head gets dim / heads)")
    if a.local_window < 1:
        raise ConfigError("attention.local_window must be >= 1 (cells)")
    if not a.local_sigma >= 0:
        raise ConfigError("attention.local_sigma must be >= 0 (0 = local_window / 4; inf = no "
                          "Gaussian)")
    if a.glimpse_size < 4:
        raise ConfigError("attention.glimpse_size must be >= 4 pixels")
    if a.kind.startswith("glimpse_"):
        if e.image_size % e.grid:
            raise ConfigError(f"{a.kind} attention carries the image's pixels cell by cell: "
                              f"encoder.image_size = {e.image_size} must be divisible by "
                              f"encoder.grid = {e.grid}")
        if a.glimpse_size > e.image_size:
            raise ConfigError(f"attention.glimpse_size = {a.glimpse_size} is larger than the "
                              f"image (encoder.image_size = {e.image_size})")
    if e.self_attention_layers < 0:
        raise ConfigError("encoder.self_attention_layers must be >= 0")
    if e.self_attention_heads < 1 or e.self_attention_dim < 1:
        raise ConfigError("encoder.self_attention_heads and encoder.self_attention_dim must be > 0")
    if e.self_attention_dim % e.self_attention_heads:
        raise ConfigError(f"encoder.self_attention_dim = {e.self_attention_dim} must be divisible "
                          f"by encoder.self_attention_heads = {e.self_attention_heads}")


def _check_label_smoothing(cfg: Config) -> None:
    ls = cfg.train.label_smoothing
    if not 0.0 <= ls < 1.0:
        raise ConfigError("train.label_smoothing must be in [0, 1)")
    if ls > 0 and (cfg.attention.kind in ("hard", "glimpse_hard") or cfg.train.objective == "scst"):
        raise ConfigError("train.label_smoothing smooths the cross-entropy objective only; hard "
                          "attention's and SCST's rewards are plain log-likelihoods / CIDEr-D")


def replace(cfg: Config, **sections: dict[str, Any]) -> Config:
    """Return a copy of ``cfg`` with some section fields replaced: replace(cfg, train={"epochs": 1})."""
    changes = {}
    for name, values in sections.items():
        if isinstance(values, dict):
            changes[name] = dataclasses.replace(getattr(cfg, name), **values)
        else:
            changes[name] = values
    return dataclasses.replace(cfg, **changes)




def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML (loadable with :func:`load_config`)."""
    d = to_dict(cfg)
    lines = [f"{k} = {_toml_value(v)}" for k, v in d.items() if not isinstance(v, dict)]
    for section, values in d.items():
        if isinstance(values, dict):
            lines += ["", f"[{section}]", *(f"{k} = {_toml_value(v)}" for k, v in values.items())]
    return "\n".join(lines) + "\n"
