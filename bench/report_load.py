"""How large attention reports get and how fast Chromium opens and drives them.

    .venv/bin/python bench/report_load.py --checkpoint soft=runs/flickr8k_soft/best.pt \
        --checkpoint hard=runs/flickr8k_hard/best.pt --images data/flickr8k/images \
        --list data/flickr8k/Flickr_8k.testImages.txt --references data/flickr8k/Flickr8k.token.txt \
        --n 10 200 [--beam 3] [--screenshot docs/inspect_report.png]

For each N: builds the report once (captioning time), writes it, then opens it from disk in
headless Chromium (Debian's chromium + chromium-driver) three times and reports the median of:
the load event (HTML parsed, script run, first image drawn), and the time to switch image
(keyboard ↓) and word (→) measured inside the page. Prints one line per N.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def open_browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or shutil.which("google-chrome")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,900", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=opts, service=Service(shutil.which("chromedriver")))


STEP_JS = """
const s = window.showattend, t0 = performance.now();
const ev = (key) => document.dispatchEvent(new KeyboardEvent('keydown', {key, bubbles: true}));
for (let i = 0; i < 10; i++) ev('ArrowDown');
const t1 = performance.now();
for (let i = 0; i < 10; i++) ev('ArrowRight');
const t2 = performance.now();
return [(t1 - t0) / 10, (t2 - t1) / 10];
"""


def measure(path: Path, runs: int = 3) -> dict[str, float]:
    d = open_browser()
    loads, images, words = [], [], []
    try:
        for _ in range(runs):
            t0 = time.perf_counter()
            d.get(path.as_uri())  # returns after the load event
            wall = time.perf_counter() - t0
            nav = d.execute_script(
                "const n = performance.getEntriesByType('navigation')[0];"
                "return [n.loadEventEnd, !!(window.showattend && window.showattend.shown[0])];")
            assert nav[1], "the page did not draw its first image"
            loads.append(max(nav[0] / 1000, 0) or wall)
            img, word = d.execute_script(STEP_JS)
            images.append(img / 1000)
            words.append(word / 1000)
        errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        d.quit()
    return {"load_s": statistics.median(loads), "image_s": statistics.median(images),
            "word_s": statistics.median(words)}


def main() -> None:
    import showattend
    from showattend.report import Report, name_models, read_references

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", action="append", required=True)
    ap.add_argument("--images", required=True, help="image folder")
    ap.add_argument("--list", help="file names to take, one a line (default: the folder, sorted)")
    ap.add_argument("--references")
    ap.add_argument("--n", type=int, nargs="+", default=[10, 200])
    ap.add_argument("--beam", type=int, default=3)
    ap.add_argument("--out", default=None, help="keep the reports here")
    ap.add_argument("--screenshot", help="PNG of the first report after clicking its 3rd word")
    args = ap.parse_args()

    folder = Path(args.images)
    if args.list:
        names = [x.strip() for x in Path(args.list).read_text().splitlines() if x.strip()]
        paths = [folder / n for n in names if (folder / n).is_file()]
    else:
        paths = sorted(p for p in folder.iterdir() if p.is_file())
    ckpts = name_models(args.checkpoint)
    models = {n: showattend.load(p) for n, p in ckpts.items()}
    refs = read_references(args.references) if args.references else None
    out = Path(args.out or tempfile.mkdtemp(prefix="report_bench_"))
    out.mkdir(parents=True, exist_ok=True)
    for n in args.n:
        t0 = time.perf_counter()
        rep = Report.build(models, paths[:n], references=refs, beam=args.beam, checkpoints=ckpts)
        build = time.perf_counter() - t0
        path = rep.save(out / f"report_{n}.html")
        m = measure(path)
        print(f"{n} images x {len(models)} models: {path.stat().st_size / 1e6:.2f} MB, "
              f"built in {build:.1f} s; Chromium: load {m['load_s']:.2f} s, next image "
              f"{m['image_s'] * 1000:.0f} ms, next word {m['word_s'] * 1000:.1f} ms  ({path})",
              flush=True)
    if args.screenshot:
        d = open_browser()
        try:
            d.get((out / f"report_{args.n[0]}.html").as_uri())
            d.execute_script("document.querySelectorAll('.panel .word')[2].click()")
            d.save_screenshot(args.screenshot)
        finally:
            d.quit()


if __name__ == "__main__":
    main()
