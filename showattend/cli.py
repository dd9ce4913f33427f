"""Command line: parses arguments and dispatches; the work lives in the library modules.

Every user error (bad value, unknown config key, missing or unreadable file, no GPU when one is
asked for) becomes one line on stderr and exit code 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

EXIT_USAGE = 2


class UserError(Exception):
    """An error caused by the user's input; printed as one line."""


def _user_errors() -> tuple[type[BaseException], ...]:
    # imported lazily so `showattend --help` stays instant
    from showattend.checkpoint import CheckpointError
    from showattend.config import ConfigError
    from showattend.data.coco import DataFormatError
    from showattend.data.entities import EntitiesError
    from showattend.data.images import ImageLoadError
    from showattend.ensemble import EnsembleError
    from showattend.explain import ExplainError
    from showattend.models.encoder import EncoderError
    from showattend.quantize import QuantizationError
    from showattend.runtime import TrainingError
    from showattend.vocab import VocabError

    return (UserError, ConfigError, DataFormatError, ImageLoadError, CheckpointError,
            EncoderError, TrainingError, VocabError, QuantizationError, EntitiesError,
            EnsembleError, ExplainError, OSError)  # OSError: missing file, disk full…


class _Parser(argparse.ArgumentParser):
    """argparse with the package's error format: one line on stderr, exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        # argparse would print the (multi-line) usage first; one line is easier to read and grep.
        self.exit(EXIT_USAGE, f"showattend: error: {message} (see '{self.prog} --help')\n")


def cmd_demo(args: argparse.Namespace) -> int:
    """Generate the built-in data, train, evaluate on the test split, write overlays, summarise."""
    from showattend.config import load_config
    from showattend.train import fit

    t0 = time.time()
    name = "demo" if args.attention == "soft" else "demo_hard"
    out = Path(args.out or f"runs/{name}")
    # json.dumps quotes a path the way TOML's basic strings want it (backslashes, quotes)
    overrides = [f"out_dir={json.dumps(str(out))}", f"data.root={json.dumps(str(out / 'data'))}",
                 *args.overrides]
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    cfg = load_config(name, overrides)  # a built-in config, shipped inside the package
    result = fit(cfg, progress=not args.quiet)
    if result.interrupted:
        print(f"demo interrupted; resume with: showattend train --config {out / 'config.toml'} "
              f"--resume")
        return 130
    m = result.test_metrics
    n_overlays = _demo_overlays(out, Path(cfg.data.root), args.overlays, cfg.train.device)
    wall = time.time() - t0
    print(f"demo ({cfg.attention.kind} attention): test BLEU-4 {m.get('BLEU-4', float('nan')):.3f}  "
          f"CIDEr {m.get('CIDEr', float('nan')):.3f}  grounding {m.get('grounding', float('nan')):.3f} "
          f"(strict {m.get('grounding_strict', float('nan')):.3f})  METEOR "
          f"{m.get('METEOR', float('nan')):.3f}  on {int(m.get('images', 0))} held-out images, "
          f"{result.epochs} epochs, train {result.train_seconds:.0f}s, wall {wall:.0f}s, "
          f"{n_overlays} overlays -> {out}")
    return 0


def _demo_overlays(out: Path, data: Path, n: int, device: str) -> int:
    import showattend
    from showattend.data.coco import read_coco_captions
    from showattend.visualize import save_attention_figure

    cap = showattend.load(out / "best.pt", device=device)
    recs = read_coco_captions(data / "captions_test.json", data, "test")[:n]
    for c in cap.caption([r.path for r in recs]):
        save_attention_figure(cap.overlay(c), out / "overlays" / f"{Path(c.image).stem}.png")
    return len(recs)


def cmd_train(args: argparse.Namespace) -> int:
    from showattend.config import load_config
    from showattend.train import fit

    overrides = list(args.overrides) + ([f"train.init={json.dumps(args.init)}"] if args.init else [])
    overrides += [f"train.precision={args.precision}"] if args.precision else []
    cfg = load_config(args.config, overrides)
    if not args.resume:  # a prepared folder says how its images were encoded
        from showattend.data.prepared import adopt_folder_encoder

        cfg, line = adopt_folder_encoder(cfg, _explicit_keys(overrides))
        if line:
            print(f"showattend: {line}", file=sys.stderr)
    result = fit(cfg, resume=args.resume, progress=not args.quiet, evaluate_test=not args.no_test)
    if result.interrupted:
        print(f"interrupted: saved {result.last or Path(cfg.out_dir) / 'last.pt'}; continue with "
              f"--resume")
        return 130
    if result.test_metrics:
        print(json.dumps({k: round(v, 4) for k, v in result.test_metrics.items()}))
    return 0


def _explicit_keys(overrides: list[str]) -> set[str]:
    """The config keys set on the command line ("--encoder.grid=7" → "encoder.grid")."""
    return {o.lstrip("-").split("=", 1)[0] for o in overrides if "=" in o}


def cmd_prepare(args: argparse.Namespace) -> int:
    from showattend.config import load_config
    from showattend.data.prepare import input_overrides, prepare

    inputs = input_overrides(args.images, args.split_file, args.annotations, args.flickr_captions,
                             args.flickr_splits, args.out)
    if args.config is None and not any(x.startswith("data.kind=") for x in inputs):
        raise UserError("prepare needs --config, or explicit inputs (--images with --split-file, "
                        "--annotations or --flickr-captions/--flickr-splits) and --out")
    if args.workers is not None and args.workers < 0:
        raise UserError("--workers must be >= 0")
    prec = [f"train.precision={args.precision}"] if args.precision else []
    split = [f"data.split={json.dumps(args.split)}"] if args.split else []
    config, why = args.config, ""
    if config is None:  # a photo setting, not the built-in demo's 64-pixel shapes
        from showattend.data.prepare import photo_defaults

        config, encoder, why = photo_defaults()
        inputs = [*encoder, *inputs]
    cfg = load_config(config, [*inputs, *split, *args.overrides, *prec])
    result = prepare(cfg, workers=args.workers, features=not args.no_features,
                     overwrite=args.overwrite, progress=not args.quiet)
    print(result.summary())
    if args.config is None:
        print(f"settings: no --config, so the photo config {config}: {why}")
    for line in result.skipped_report(every=args.verbose):
        print(f"showattend: {line}", file=sys.stderr)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.model and args.checkpoint:
        raise UserError("give --checkpoint or --model, not both")
    model = args.checkpoint or args.model
    if args.images:
        if not args.annotations:
            raise UserError("--images goes with --annotations (a COCO-format captions json)")
        from showattend.evaluation import evaluate_folder

        try:
            metrics, skipped = evaluate_folder(_default_model(model), args.images,
                                               args.annotations, beam=args.beam,
                                               device=args.device, meteor=not args.no_meteor,
                                               out_dir=args.out, precision=args.precision)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        for line in skipped:
            print(f"showattend: skipped: {line}", file=sys.stderr)
        print(json.dumps({k: round(v, 4) for k, v in metrics.items()}))
        return 0
    if args.model:
        args.checkpoint = args.model
        args.out = args.out or "."
    if args.results or args.annotations:
        if not (args.results and args.annotations):
            raise UserError("--results and --annotations go together")
        from showattend.data.coco import read_coco_captions
        from showattend.metrics import caption_metrics, read_coco_results

        hyps = read_coco_results(args.results)
        if not hyps:
            raise UserError(f"{args.results} holds no results to score")
        recs = read_coco_captions(args.annotations, ".", "test")
        refs = {r.image_id: list(r.captions) for r in recs if r.captions}
        missing = sorted(set(refs) - set(hyps))
        extra = sorted(set(hyps) - set(refs))
        if extra:
            raise UserError(f"{args.results}: image_id {extra[0]} has no reference captions in "
                            f"{args.annotations} ({len(extra)} such results)")
        if missing:
            logging.warning("%d annotated images have no result; scoring the %d that do",
                            len(missing), len(hyps))
        metrics = caption_metrics(hyps, {k: refs[k] for k in hyps}, meteor=not args.no_meteor)
        print(json.dumps({k: round(v, 4) for k, v in metrics.items()}))
        return 0
    if not args.checkpoint:
        raise UserError("evaluate needs --checkpoint (or --results with --annotations)")
    from showattend.evaluation import evaluate_checkpoint, grounding_line

    metrics = evaluate_checkpoint(args.checkpoint, args.split, beam=args.beam, out_dir=args.out,
                                  device=args.device, meteor=False if args.no_meteor else None,
                                  progress=not args.quiet, mode=args.mode,
                                  length_norm=args.length_norm,
                                  no_repeat_ngram=args.no_repeat_ngram, int8=args.int8,
                                  entities=args.entities,
                                  allow_unk=True if args.allow_unk else None,
                                  precision=args.precision,
                                  explain_references=args.explain_references)
    print(json.dumps({k: round(v, 4) for k, v in metrics.items()}))
    if "correctness" in metrics:
        print(f"photo grounding ({args.split}): {grounding_line(metrics)}", file=sys.stderr)
    if "references/correctness" in metrics:
        print(f"photo grounding of the reference captions, teacher forced ({args.split}): "
              f"{grounding_line(metrics, 'references/')}", file=sys.stderr)
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    overlay_dir = Path(args.overlay_dir) if args.overlay_dir else None
    if overlay_dir is not None and overlay_dir.exists() and not overlay_dir.is_dir():
        raise UserError(f"--overlay-dir {overlay_dir} exists and is not a directory")
    if args.workers is not None and args.workers < 0:
        raise UserError("--workers must be >= 0")
    if args.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    if args.entities and overlay_dir is None:
        raise UserError("--entities draws reference boxes on the overlays: give --overlay-dir")
    photos = _entities_for(args.entities, args.images)
    quiet = logging.getLogger("showattend.data.images")
    level = quiet.level
    if not args.verbose:  # a readable file's decoder chatter (bad TIFF tags, EXIF) is no news
        quiet.setLevel(logging.ERROR)
    try:
        return _caption_run(args, photos, overlay_dir)
    finally:
        quiet.setLevel(level)  # in-process callers (tests, notebooks) keep their logging


def _caption_run(args: argparse.Namespace, photos: dict, overlay_dir: Path | None) -> int:
    import showattend
    from showattend.visualize import save_attention_figure

    cap = showattend.load(_default_model(args.checkpoint), device=args.device, int8=args.int8,
                          precision=args.precision)
    failed = done = 0
    records = []
    used_names: set[str] = set()
    for path, c, err in cap.caption_paths(args.images, beam=args.beam, mode=args.mode,
                                          batch_size=args.batch_size, workers=args.workers):
        if err is not None:
            failed += 1
            print(f"showattend: skipped: {err}", file=sys.stderr)
            continue
        done += 1
        if args.json:
            records.append(c.to_json())
        else:
            print(f"{path}\t{c.caption}")
        if overlay_dir is not None:
            photo = photos.get(str(path))
            grounding = cap.word_scores(c, photo) if photo is not None else None
            save_attention_figure(cap.overlay(c, grounding=grounding),
                                  overlay_dir / _unique_name(path, used_names))
    if args.json:
        json.dump(records, sys.stdout)
        sys.stdout.write("\n")
    if done + failed == 0:
        raise UserError("no images found in the given paths")
    if failed:
        print(f"showattend: {failed} of {done + failed} images failed", file=sys.stderr)
        return 1
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    """Teacher-force texts a person writes and show where the model looks for each word."""
    from showattend.explain import gather_texts, unknown_line
    from showattend.visualize import save_attention_figure

    overlay_dir = Path(args.overlay_dir) if args.overlay_dir else None
    if overlay_dir is not None and overlay_dir.exists() and not overlay_dir.is_dir():
        raise UserError(f"--overlay-dir {overlay_dir} exists and is not a directory")
    texts_for, refs = gather_texts(args.text or [], args.texts, args.references)
    import showattend

    photos = _entities_for(args.entities, args.images)
    cap = showattend.load(_default_model(args.checkpoint), device=args.device,
                          precision=args.precision)
    records, failed, done, unknown = [], 0, 0, []
    used_names: set[str] = set()
    for path, recs, err in cap.explain_paths(args.images, texts_for, mode=args.mode,
                                             beam=args.beam, batch_size=args.batch_size):
        if err is not None:
            failed += 1
            print(f"showattend: skipped: {err}", file=sys.stderr)
            continue
        done += 1
        photo = photos.get(str(path))
        for k, c in enumerate(recs):
            unknown.extend(c.unknown or [])
            grounding = cap.word_scores(c, photo) if photo is not None else None
            if args.json:
                records.append(_explained_json(c, grounding))
            else:
                print(f"{path}\t{c.score:.3f}\t{c.caption}\t" + " ".join(
                    f"{w}:{lp:.2f}" for w, lp in zip(c.words, c.logp)) + f" <end>:{c.end_logp:.2f}")
            if overlay_dir is not None:
                save_attention_figure(cap.overlay(c, grounding=grounding),
                                      overlay_dir / _unique_name(Path(f"{path.stem}_{k}{path.suffix}"),
                                                                 used_names))
        if recs and not args.json:
            print(f"{path}\t{recs[0].model_score:.3f}\t[model] {recs[0].model_caption}")
    if args.json:
        json.dump(records, sys.stdout)
        sys.stdout.write("\n")
    if unknown:
        print(f"showattend: {unknown_line(unknown)}", file=sys.stderr)
    if refs is not None and done + failed == 0:
        raise UserError(f"no image under the given paths has a caption in {args.references}")
    if done + failed == 0:
        raise UserError("no images found in the given paths")
    return 1 if failed else 0


def _explained_json(c, grounding) -> dict:
    """An explained caption's record, with each word's attention correctness under --entities."""
    rec = c.to_json()
    if grounding is not None:
        from showattend.reference_boxes import per_word

        rec["correctness"] = [None if v is None else round(float(v), 6)
                              for v in per_word(grounding, len(c.words))[1]]
    return rec


def _entities_for(entities: str | None, images: list[str]) -> dict:
    """{image path: its Flickr30k Entities annotations} for ``--entities`` (empty without)."""
    if not entities:
        return {}
    from showattend.data.folder import iter_image_paths
    from showattend.reference_boxes import photos_for_images

    photos = photos_for_images(entities, iter_image_paths(images))
    if not photos:
        print(f"showattend: warning: no image is annotated in {entities} (file names must "
              f"start with the photo's Flickr id, as in 1000268201_693b08cb0e.jpg)",
              file=sys.stderr)
    return photos


def _default_model(checkpoint: str | None) -> str:
    """``--checkpoint`` or, without one, the shipped photo model (said on stderr)."""
    if checkpoint:
        return checkpoint
    from showattend.registry import DEFAULT_MODEL, get

    info = get(DEFAULT_MODEL)
    print(f"showattend: no --checkpoint: using the shipped model {info.name!r} "
          f"({info.description})", file=sys.stderr)
    return info.name


def _load_models(checkpoints: list[str] | None, device: str, precision: str | None = None
                 ) -> tuple[dict, dict[str, str]]:
    """{name: loaded model} and {name: checkpoint} for repeated --checkpoint [NAME=]PATH (the
    shipped model when there is none)."""
    import showattend
    from showattend.report import name_models

    paths = name_models(checkpoints or [_default_model(None)])
    return {n: showattend.load(p, device=device, precision=precision)
            for n, p in paths.items()}, paths


def cmd_inspect(args: argparse.Namespace) -> int:
    from showattend.report import Report, read_references

    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give the report's file name")
    refs = read_references(args.references) if args.references else None
    if args.entities:
        from showattend.reference_boxes import photos_for_images

        photos_for_images(args.entities, [])  # an unreadable source fails before any captioning
    models, paths = _load_models(args.checkpoint, args.device, args.precision)
    report = Report.build(models, args.images, references=refs, beam=args.beam, mode=args.mode,
                          checkpoints=paths, title=args.title, progress=not args.quiet,
                          entities=args.entities)
    for path, reason in report.skipped:
        print(f"showattend: skipped: {reason}", file=sys.stderr)
    if not report.entries:
        raise UserError("no readable images in the given paths")
    report.save(out)
    parts = [f"{out} ({out.stat().st_size / 1e6:.2f} MB)"]
    if args.json:
        report.save_json(args.json)
        parts.append(f"{args.json}")
    if args.animations:
        files = report.save_animations(args.animations, fmt=args.animation_format)
        parts.append(f"{len(files)} animations in {args.animations}")
    n_refs = sum(1 for e in report.entries if e.references)
    n_boxed = sum(1 for e in report.entries if e.photo is not None)
    print(f"inspect: {len(report.entries)} images x {len(models)} models"
          f"{f', {n_refs} with references' if refs else ''}"
          f"{f', {n_boxed} with reference boxes' if args.entities else ''} -> {', '.join(parts)}")
    if refs is not None and n_refs == 0:
        print(f"showattend: warning: no image matched a name in {args.references}",
              file=sys.stderr)
    if args.entities and n_boxed == 0:
        print(f"showattend: warning: no image is annotated in {args.entities} (file names must "
              f"start with the photo's Flickr id, as in 1000268201_693b08cb0e.jpg)",
              file=sys.stderr)
    return 1 if report.skipped else 0


def cmd_export_model(args: argparse.Namespace) -> int:
    from showattend.registry import export_model

    fields = export_model(args.checkpoint, args.out, name=args.name or "")
    print(json.dumps({"file": str(args.out), **fields}))
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    from showattend.ensemble import join_checkpoints

    print(json.dumps(join_checkpoints(args.checkpoint, args.out, name=args.name or "")))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from showattend.serve import serve

    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port} is not a port number")
    if args.max_upload_mb <= 0:
        raise UserError("--max-upload-mb must be positive")
    models, paths = _load_models(args.checkpoint, args.device, args.precision)

    def ready(url: str) -> None:
        print(f"serving {url}  ({', '.join(models)}; Ctrl-C stops)", flush=True)
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print("showattend: warning: listening beyond this machine; anyone who can reach "
                  f"{args.host} can use the model", file=sys.stderr, flush=True)

    serve(models, host=args.host, port=args.port, beam=args.beam, mode=args.mode,
          checkpoints=paths, max_upload=int(args.max_upload_mb * 1024 * 1024), ready=ready)
    return 0


def _unique_name(path: Path, used: set[str]) -> str:
    """Overlay file name for ``path``: its stem, numbered when two inputs share one."""
    name, n = f"{path.stem}.png", 1
    while name in used:
        n += 1
        name = f"{path.stem}_{n}.png"
    used.add(name)
    return name


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="showattend", description="Show, Attend and Tell captioning "
                                "with soft and hard attention.")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    from showattend import __version__

    p.add_argument("--version", action="version", version=f"showattend {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="built-in end-to-end run on synthetic grounded shapes")
    d.add_argument("--out", default=None,
                   help="output directory (default runs/demo, or runs/demo_hard with --attention hard)")
    d.add_argument("--attention", choices=("soft", "hard"), default="soft")
    d.add_argument("--epochs", type=int, default=None, help="override the number of epochs")
    d.add_argument("--overlays", type=int, default=6, help="test images to draw overlays for")
    d.add_argument("overrides", nargs="*", help="config overrides section.key=value")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="train from a TOML config")
    t.add_argument("--config", required=True,
                   help="TOML config file, or a built-in config name (demo, coco_soft, ...)")
    t.add_argument("--resume", action="store_true", help="continue from OUT_DIR/last.pt")
    t.add_argument("--init", metavar="CK", help="start from this checkpoint's weights or a "
                   "shipped model's (train.init; e.g. a cross-entropy best.pt or \"flickr8k\" "
                   "for train.objective = \"scst\")")
    t.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=None,
                   help="train.precision: auto = bf16 where the device has fast bf16 (default: the config's, fp32)")
    t.add_argument("--no-test", action="store_true", help="end without evaluating best.pt on "
                   "the test split (when `evaluate` follows, with its own options)")
    t.set_defaults(func=cmd_train)

    pp = sub.add_parser("prepare", help="read captions + images once into a prepared folder "
                        "(uint8 image store, feature cache, vocabulary)")
    pp.add_argument("--config", help="TOML config whose [data] names the inputs and "
                    "data.prepared the output ([encoder] sets image size and backbone)")
    pp.add_argument("--images", help="image folder (data.root)")
    src = pp.add_mutually_exclusive_group()
    src.add_argument("--split-file", help="Karpathy split file (dataset_flickr8k.json, ...)")
    src.add_argument("--annotations", nargs="+", metavar="F",
                     help="COCO-format captions json: one file (split by --split), or train, "
                          "val [, test]; --images may be the COCO root (train2014/, val2017/ …)")
    src.add_argument("--flickr-captions", help="Flickr token file (Flickr8k.token.txt)")
    pp.add_argument("--flickr-splits", help="folder with the Flickr split lists")
    pp.add_argument("--split", metavar="TRAIN,VAL,TEST", help="one captions file: the shares of "
                    "its images for train, val and test (data.split, default 0.8,0.1,0.1; drawn "
                    "with data.seed and saved in the folder's manifest)")
    pp.add_argument("--out", help="output folder (data.prepared)")
    pp.add_argument("--workers", type=int, default=None,
                    help="image-decoding processes (default: data.num_workers or CPU count)")
    pp.add_argument("--no-features", action="store_true", help="no feature cache")
    pp.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=None,
                   help="train.precision for the feature cache's encoder (auto, fp32, bf16)")
    pp.add_argument("--overwrite", action="store_true",
                    help="replace a finished folder made from other inputs or settings")
    pp.set_defaults(func=cmd_prepare)

    e = sub.add_parser("evaluate", help="score a checkpoint on a split, or a COCO results file")
    e.add_argument("--checkpoint", help="checkpoint file or run directory")
    e.add_argument("--model", help="a shipped model by name (showattend.available_models())")
    e.add_argument("--images", help="image folder of --annotations: caption and score every "
                   "annotated image found there (missing ones are reported and skipped)")
    e.add_argument("--split", default="test", choices=("train", "val", "test"))
    e.add_argument("--beam", type=int, default=None, help="beam size (default: from the config)")
    e.add_argument("--length-norm", type=float, default=None,
                   help="rank beams by score / (words + 1) ** X (default: eval.length_norm)")
    e.add_argument("--no-repeat-ngram", type=int, default=None,
                   help="never repeat an n-gram in a caption, 0 = off (default: eval.no_repeat_ngram)")
    e.add_argument("--mode", choices=("expectation", "argmax", "sample", "mc"),
                   help="hard attention test-time mode")
    e.add_argument("--explain-references", action="store_true",
                   help="also score where the model looks for the words of the split's human "
                        "captions, teacher forced, against the boxes (Liu et al.); needs "
                        "--entities or data.entities")
    e.add_argument("--allow-unk", action="store_true",
                   help="let decoding generate <unk> (eval.allow_unk; off by default)")
    e.add_argument("--results", help="COCO-format results json [{image_id, caption}]")
    e.add_argument("--annotations", help="COCO captions json with the references")
    e.add_argument("--out", help="where to write metrics/results (default: next to checkpoint)")
    e.add_argument("--device", default="auto")
    e.add_argument("--no-meteor", action="store_true", help="skip METEOR (saves ~10 s of Java)")
    e.add_argument("--int8", action="store_true", help="dynamic int8 decoder (CPU)")
    e.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=None,
                   help="eval.precision: auto = bf16 where the device has fast bf16 (default: the checkpoint's, fp32)")
    e.add_argument("--entities", help="Flickr30k Entities annotations (annotations.zip or its "
                                      "folder): score attention against the human boxes")
    e.set_defaults(func=cmd_evaluate)

    c = sub.add_parser("caption", help="caption images or folders of images")
    c.add_argument("images", nargs="+", help="image files or folders")
    c.add_argument("--checkpoint", help="checkpoint file, run directory or shipped model name "
                   "(default: the shipped photo model, flickr8k)")
    c.add_argument("--beam", type=int, default=None)
    c.add_argument("--mode", choices=("expectation", "argmax", "sample", "mc"),
                   help="hard attention test-time mode")
    c.add_argument("--overlay-dir", help="write one attention overlay PNG per image here")
    c.add_argument("--entities", help="Flickr30k Entities annotations (annotations.zip or its "
                   "folder): on the overlays, draw the reference boxes of each word that names "
                   "a boxed thing, with its attention correctness")
    c.add_argument("--json", action="store_true", help="print JSON records instead of text")
    c.add_argument("--device", default="auto")
    c.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=None,
                   help="eval.precision (default: the checkpoint's, fp32)")
    c.add_argument("--int8", action="store_true",
                   help="dynamic int8 decoder for CPU serving (encoder stays fp32)")
    c.add_argument("--batch-size", type=int, default=16, help="images per model call")
    c.add_argument("--workers", type=int, default=None,
                   help="image-decoding processes running ahead of the model (default: up to "
                        "2 for more than one batch, 0 = none)")
    c.set_defaults(func=cmd_caption)

    xp = sub.add_parser("explain", help="where the model looks for the words of a caption you "
                        "write: each word teacher-forced, its map, log p, rank and the model's "
                        "top words")
    xp.add_argument("images", nargs="+", help="image files or folders")
    xp.add_argument("--text", action="append", help="a caption to explain (repeat for several)")
    xp.add_argument("--texts", help="a file of captions, one a line, each explained on every image")
    xp.add_argument("--references", help="every reference caption of each image: COCO captions "
                    "json, Karpathy split file or Flickr token file")
    xp.add_argument("--checkpoint", help="checkpoint, run directory or shipped model name "
                    "(default: the shipped photo model, flickr8k)")
    xp.add_argument("--beam", type=int, default=None, help="beam of the model's own caption")
    xp.add_argument("--mode", choices=("expectation", "argmax", "sample", "mc"),
                    help="attention test-time mode (hard attention; soft: the chosen cell)")
    xp.add_argument("--overlay-dir", help="one overlay PNG per explained caption, log p per word")
    xp.add_argument("--entities", help="Flickr30k Entities annotations: each word's attention "
                    "correctness in the records (and its boxes on the overlays)")
    xp.add_argument("--json", action="store_true", help="print JSON records (as caption --json, "
                    "plus text, logp, rank, top, end_logp, unknown, model_caption, model_score)")
    xp.add_argument("--device", default="auto")
    xp.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=None)
    xp.add_argument("--batch-size", type=int, default=16, help="images per model call")
    xp.set_defaults(func=cmd_explain)

    i = sub.add_parser("inspect", help="interactive HTML report of the attention of one or more "
                       "models on images (self-contained, opens from disk)")
    i.add_argument("images", nargs="+", help="image files or folders")
    i.add_argument("--checkpoint", action="append", metavar="[NAME=]PATH",
                   help="checkpoint, run directory or shipped model name; repeat to compare "
                   "models side by side (default: the shipped photo model)")
    i.add_argument("--out", default="report.html", help="the HTML file to write")
    i.add_argument("--references", help="reference captions: COCO captions json, Karpathy "
                   "split file, Flickr token file or {image name: [captions]}")
    i.add_argument("--beam", type=int, default=None, help="beam size; all beams are shown")
    i.add_argument("--mode", choices=("expectation", "argmax", "sample", "mc"),
                   help="hard attention test-time mode")
    i.add_argument("--json", help="also write the data (words, maps, β, scores, boxes) as JSON")
    i.add_argument("--animations", metavar="DIR",
                   help="also write one animation per image and model here")
    i.add_argument("--animation-format", choices=("gif", "apng"), default="gif")
    i.add_argument("--entities", help="Flickr30k Entities annotations (annotations.zip or its "
                   "folder): show the reference boxes of the word looked at and its attention "
                   "correctness; sort by worst grounding (images named <flickr id>_*.jpg)")
    i.add_argument("--title", help="the report's title")
    i.add_argument("--device", default="auto")
    i.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=None,
                   help="eval.precision (default: the checkpoint's, fp32)")
    i.set_defaults(func=cmd_inspect)

    x = sub.add_parser("export-model", help="write a trained checkpoint as a shippable model "
                       "file (float16 weights, no frozen ImageNet encoder) and print its SHA-256")
    x.add_argument("--checkpoint", required=True, help="checkpoint file or run directory")
    x.add_argument("--out", required=True, help="the model file to write")
    x.add_argument("--name", help="the registry name it will have (sets its config's name)")
    x.set_defaults(func=cmd_export_model)

    en = sub.add_parser("ensemble", help="join checkpoints of one model trained from different "
                        "seeds into one checkpoint that decodes with all of them")
    en.add_argument("--checkpoint", action="append", required=True,
                    help="checkpoint or run directory; repeat (at least 2)")
    en.add_argument("--out", required=True, help="the ensemble checkpoint to write")
    en.add_argument("--name", help="its config name (default: the first member's + _xN)")
    en.set_defaults(func=cmd_ensemble)

    sv = sub.add_parser("serve", help="local web page: drop a photo, inspect its attention")
    sv.add_argument("--checkpoint", action="append", metavar="[NAME=]PATH",
                    help="checkpoint, run directory or shipped model name; repeat for several "
                    "models (default: the shipped photo model)")
    sv.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: this machine only)")
    sv.add_argument("--port", type=int, default=8000, help="port (0: any free one)")
    sv.add_argument("--beam", type=int, default=None)
    sv.add_argument("--mode", choices=("expectation", "argmax", "sample", "mc"),
                   help="hard attention test-time mode")
    sv.add_argument("--max-upload-mb", type=float, default=20.0,
                   help="largest accepted upload (default 20)")
    sv.add_argument("--device", default="auto")
    sv.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=None,
                   help="eval.precision (default: the checkpoint's, fp32)")
    sv.set_defaults(func=cmd_serve)
    _add_examples(sub)
    return p


#: each subcommand's help ends with a line as it is typed
EXAMPLES = {
    "demo": "showattend demo --attention hard",
    "train": "showattend train --config flickr8k_hard --train.epochs=3 --train.lr=2e-4",
    "prepare": "showattend prepare --config flickr8k_soft --encoder.backbone=efficientnet_lite1",
    "evaluate": "showattend evaluate --model flickr8k --split test --entities "
                "data/flickr8k/annotations.zip --explain-references",
    "caption": "showattend caption photo.jpg photos/ --checkpoint flickr8k-hard --overlay-dir out/",
    "explain": "showattend explain photo.jpg --text \"a dog runs on the beach\" --overlay-dir out/",
    "inspect": "showattend inspect photos/ --checkpoint flickr8k --checkpoint flickr8k-hard "
               "--out report.html",
    "export-model": "showattend export-model --checkpoint runs/flickr8k_hard/best.pt "
                    "--name flickr8k-hard --out flickr8k-hard.pt",
    "ensemble": "showattend ensemble --checkpoint runs/a --checkpoint runs/b --out ens.pt",
    "serve": "showattend serve --checkpoint flickr8k --checkpoint flickr8k-hard --port 8000",
}
OVERRIDES = ("Any config key can be set on the command line as --section.key=value "
             "(e.g. --train.lr=2e-4), after the config file is read.")


def _add_examples(sub) -> None:
    for name, cmd in sub.choices.items():
        cmd.formatter_class = argparse.RawDescriptionHelpFormatter
        extra = f"{OVERRIDES}\n\n" if name in ("train", "prepare", "demo") else ""
        cmd.epilog = f"{extra}example:\n  {EXAMPLES[name]}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``showattend`` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command in ("train", "prepare"):
        args.overrides = extra
    elif args.command == "demo":
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    for name in ("beam", "epochs", "overlays"):
        v = getattr(args, name, None)
        if v is not None and v < (0 if name in ("epochs", "overlays") else 1):
            parser.error(f"--{name} must be positive")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="showattend: %(message)s")
    try:
        errors = _user_errors()
        return args.func(args)
    except KeyboardInterrupt:
        print("showattend: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # output piped into `head` & co.: the reader left, which is not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except Exception as exc:  # noqa: BLE001 - map known user errors to one line
        if args.verbose or not isinstance(exc, errors):
            raise
        lines = str(exc).strip().splitlines()
        msg = lines[0] if lines else type(exc).__name__
        if len(lines) > 1 and lines[0].startswith("Caught ") and "worker" in lines[0]:
            # torch re-raises a DataLoader worker's exception with the worker's traceback as its
            # message; the useful line (naming the file) is the last one, "module.Error: text".
            msg = lines[-1].split(": ", 1)[-1]
        if isinstance(exc, OSError) and exc.filename and exc.strerror:
            msg = f"{exc.strerror}: {exc.filename}"
        print(f"showattend: error: {msg}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
