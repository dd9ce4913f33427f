"""The report and the serve page in a real headless Chromium (Debian's chromium + chromium-driver,
driven by selenium): clicking a word shows that word's map (the page's data and the canvas pixels
are compared with the model's maps), keyboard navigation, beams, sorting, the Jupyter view, and
uploads to ``showattend serve`` (a photo, and a text file named .jpg) — with no console errors.

Screenshots go to $SHOWATTEND_SCREENSHOTS when set (else to the test's tmp folder).
"""

from __future__ import annotations

import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import showattend
from showattend.report import Report, decode_maps, read_references
from showattend.visualize import upsample_attention

from inspect_fixtures import soft_hard, test_images  # noqa: F401 - fixtures

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(__file__).parent / "assets"


def _which(*names: str) -> str | None:
    return next((p for p in map(shutil.which, names) if p), None)


CHROMIUM = _which("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DRIVER = _which("chromedriver")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                       reason="needs Chromium and its driver: apt-get install chromium "
                              "chromium-driver (.ci/run installs them)"),
]
webdriver = pytest.importorskip("selenium.webdriver",
                                reason="needs selenium: pip install 'showattend[test]'")
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def driver():
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(options=opts, service=Service(DRIVER))
    d.set_page_load_timeout(30)
    yield d
    d.quit()


@pytest.fixture
def shots(tmp_path) -> Path:
    folder = Path(os.environ.get("SHOWATTEND_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def console_errors(d) -> list[str]:
    """SEVERE browser-log entries since the last call (reading the log empties it)."""
    return [e["message"] for e in d.get_log("browser") if e["level"] == "SEVERE"]


@pytest.fixture(scope="module")
def report(soft_hard, test_images, tmp_path_factory):
    data, soft, hard = soft_hard
    models = {"soft": showattend.load(soft, device="cpu"),
              "hard": showattend.load(hard, device="cpu")}
    rep = Report.build(models, test_images[:6], beam=3,
                       references=read_references(data / "captions_test.json"))
    path = rep.save(tmp_path_factory.mktemp("report") / "report.html")
    return rep, path


def open_report(d, path: Path) -> None:
    d.get(path.as_uri())
    WebDriverWait(d, 10).until(lambda x: x.execute_script("return !!window.showattend"))
    console_errors(d)  # start each test with an empty log (navigation itself logs nothing)


def heat_alpha(d, model: int) -> np.ndarray:
    """The alpha channel of a panel's heat canvas: opacity 0.15 + 0.55·heat, (H, W)."""
    w, h, alpha = d.execute_script(
        "const c = document.querySelector(`.panel[data-model='${arguments[0]}'] canvas.heat`);"
        "const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "const a = []; for (let i = 3; i < px.length; i += 4) a.push(px[i]);"
        "return [c.width, c.height, a];", model)
    return np.asarray(alpha, dtype=np.float64).reshape(h, w)


def expected_alpha(word_map: np.ndarray, size: tuple[int, int], smooth: bool = True) -> np.ndarray:
    heat = upsample_attention(word_map, size, smooth=smooth)
    return np.rint(255 * (0.15 + 0.55 * heat))


def word_maps(rep: Report, image: int, model: int, beam: int = 0) -> np.ndarray:
    b = rep.page_data()["images"][image]["results"][model]["beams"][beam]
    return decode_maps(b["maps"], b["peaks"], rep.models[model].grid)


def assert_shows(d, rep: Report, image: int, model: int, word: int, beam: int = 0,
                 smooth: bool = True) -> None:
    """The panel shows word ``word``: its data, its highlighted word and its heat pixels."""
    shown = d.execute_script("return window.showattend.shown[arguments[0]]", model)
    cap = rep.entries[image].captions[model]
    alt = (cap.alternatives or [cap])[beam]
    assert (shown["image"], shown["beam"], shown["word"]) == (image, beam, word)
    assert shown["text"] == alt.words[word]
    maps = word_maps(rep, image, model, beam)
    np.testing.assert_allclose(shown["map"], maps[word].ravel(), atol=1e-12)
    # the page's map is the model's map up to the uint8 quantisation
    np.testing.assert_allclose(shown["map"], alt.attention[word].ravel(),
                               atol=alt.attention[word].max() / 510 + 1e-6)
    on = d.find_elements(By.CSS_SELECTOR, f".panel[data-model='{model}'] .word.on")
    assert [e.text.strip() for e in on] == [alt.words[word]]
    got = heat_alpha(d, model)
    want = expected_alpha(maps[word], got.shape, smooth)
    assert np.abs(got - want).max() <= 1, f"heat pixels differ from word {word}'s map"


def test_click_a_word_shows_that_words_map(driver, report, shots):
    rep, path = report
    open_report(driver, path)
    n_distinct = 0
    for model in (0, 1):
        words = driver.find_elements(By.CSS_SELECTOR, f".panel[data-model='{model}'] .word")
        cap = rep.entries[0].captions[model]
        assert [w.text.strip() for w in words] == cap.words
        for t in [*range(1, len(words)), 0]:
            words[t].click()
            assert_shows(driver, rep, 0, model, t)
            maps = word_maps(rep, 0, model)
            nxt = maps[(t + 1) % len(maps)]
            n_distinct += int(np.abs(nxt - maps[t]).max() > 0.01)
    assert n_distinct > 5  # the maps differ from word to word, so a wrong word would show
    # cells view: the same map drawn as nearest-neighbour blocks
    driver.find_element(By.CSS_SELECTOR, "input[name=style][value=cells]").click()
    driver.find_elements(By.CSS_SELECTOR, ".panel[data-model='1'] .word")[2].click()
    assert_shows(driver, rep, 0, 1, 2, smooth=False)
    driver.save_screenshot(str(shots / "report_cells.png"))
    driver.find_element(By.CSS_SELECTOR, "input[name=style][value=smooth]").click()
    assert console_errors(driver) == []


def test_keyboard_moves_between_words_and_images(driver, report, shots):
    rep, path = report
    open_report(driver, path)
    keys = ActionChains(driver)

    def press(key):
        keys.send_keys(key).perform()

    driver.find_elements(By.CSS_SELECTOR, ".panel[data-model='0'] .word")[0].click()
    press(Keys.ARROW_RIGHT)
    assert_shows(driver, rep, 0, 0, 1)
    press(Keys.ARROW_RIGHT)
    assert_shows(driver, rep, 0, 0, 2)
    press(Keys.ARROW_LEFT)
    assert_shows(driver, rep, 0, 0, 1)
    n = len(rep.entries[0].captions[0].words)
    for _ in range(n + 2):  # stops at the last word
        press(Keys.ARROW_RIGHT)
    assert_shows(driver, rep, 0, 0, n - 1)
    press(Keys.ARROW_DOWN)
    assert driver.find_element(By.ID, "name").text == rep.entries[1].name
    assert_shows(driver, rep, 1, 0, 0)
    assert_shows(driver, rep, 1, 1, 0)
    press("m")  # the keys now move in the second model's caption
    press(Keys.ARROW_RIGHT)
    assert_shows(driver, rep, 1, 1, 1)
    assert_shows(driver, rep, 1, 0, 0)
    driver.save_screenshot(str(shots / "report_keyboard.png"))
    press(Keys.ARROW_UP)
    assert driver.find_element(By.ID, "name").text == rep.entries[0].name
    press(Keys.ARROW_UP)  # already the first image
    assert driver.find_element(By.ID, "name").text == rep.entries[0].name
    assert console_errors(driver) == []


def test_beams_and_sort_by_worst(driver, report, shots):
    rep, path = report
    open_report(driver, path)
    # the model's three beams (the explained reference captions follow them, marked)
    alts = driver.find_elements(By.CSS_SELECTOR, ".panel[data-model='0'] .beams li:not(.explained)")
    cap = rep.entries[0].captions[0]
    assert len(alts) == 3
    for li, alt in zip(alts, cap.alternatives):
        assert li.text.startswith(" ".join(alt.words)) and f"log p {alt.score:.2f}" in li.text
    alts[1].click()
    assert_shows(driver, rep, 0, 0, 0, beam=1)
    driver.find_elements(By.CSS_SELECTOR, ".panel[data-model='0'] .word")[1].click()
    assert_shows(driver, rep, 0, 0, 1, beam=1)

    Select(driver.find_element(By.ID, "sort")).select_by_value("BLEU-4:1")
    bleu = [e.scores[1]["BLEU-4"] for e in rep.entries]
    order = [int(x.get_attribute("data-image"))
             for x in driver.find_elements(By.CSS_SELECTOR, "#list .item")]
    assert [bleu[i] for i in order] == sorted(bleu)  # worst first
    assert driver.find_element(By.ID, "name").text == rep.entries[order[0]].name
    scores = driver.find_element(By.CSS_SELECTOR, ".panel[data-model='1'] .scores").text
    assert f"BLEU-4 {bleu[order[0]]:.3f}" in scores
    refs = driver.execute_script("return [...document.querySelectorAll('#refs li')]"
                                 ".map(x => x.textContent)")
    assert refs == rep.entries[order[0]].references
    driver.save_screenshot(str(shots / "report.png"))
    assert console_errors(driver) == []


def test_notebook_view_works_inside_its_iframe(driver, report, tmp_path):
    rep, _ = report
    cap = rep.entries[2].captions[1]  # a hard-attention caption, as cap.caption(...) returns it
    page = tmp_path / "notebook.html"
    page.write_text(f"<!DOCTYPE html><html><body><h1>notebook</h1>{cap._repr_html_()}"
                    "</body></html>", "utf-8")
    driver.get(page.as_uri())
    driver.switch_to.frame(driver.find_element(By.CSS_SELECTOR, "iframe.showattend-report"))
    try:
        WebDriverWait(driver, 10).until(lambda x: x.execute_script("return !!window.showattend"))
        words = driver.find_elements(By.CSS_SELECTOR, ".panel[data-model='0'] .word")
        assert [w.text.strip() for w in words] == cap.words
        words[-1].click()
        shown = driver.execute_script("return window.showattend.shown[0]")
        assert shown["word"] == len(cap.words) - 1
        np.testing.assert_allclose(shown["map"], cap.attention[-1].ravel(),
                                   atol=cap.attention[-1].max() / 510 + 1e-6)
        info = driver.find_element(By.CSS_SELECTOR, ".panel .info").text
        assert "crop (" in info  # hard attention shows its crop box
    finally:
        driver.switch_to.default_content()
    assert console_errors(driver) == []


def test_empty_caption_shows_the_image_without_errors(driver, report, tmp_path):
    from dataclasses import replace

    rep, _ = report
    c = rep.entries[0].captions[0]
    empty = replace(c, caption="", words=[], score=-0.5, attention=np.zeros((0, 8, 8)),
                    beta=np.zeros(0), locations=np.zeros(0, dtype=np.int64), alternatives=[])
    path = Report.from_captions({"m": [empty, c]}).save(tmp_path / "empty.html")
    open_report(driver, path)
    assert "empty caption" in driver.find_element(By.CSS_SELECTOR, ".panel .info").text
    ActionChains(driver).send_keys(Keys.ARROW_RIGHT).send_keys(Keys.ARROW_DOWN).perform()
    assert driver.execute_script("return window.showattend.shown[0].text") == c.words[0]
    assert console_errors(driver) == []


# ---------------------------------------------------------------------------- serve


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(soft_hard):
    _, soft, hard = soft_hard
    port = _free_port()
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "showattend", "-q", "serve", "--checkpoint", f"soft={soft}",
         "--checkpoint", f"hard={hard}", "--port", str(port), "--beam", "2", "--device", "cpu",
         "--max-upload-mb", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    url, deadline, seen = None, time.time() + 120, []
    while url is None and time.time() < deadline and proc.poll() is None:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        seen.append(line)
        if line.startswith("serving "):
            url = line.split()[1]
    if url is None:
        proc.kill()
        pytest.fail("showattend serve did not start:\n" + "".join(seen))
    yield url, proc
    proc.terminate()
    proc.wait(timeout=20)


def test_serve_upload_photo_then_bad_file_server_keeps_serving(driver, served, tmp_path, shots):
    url, proc = served
    assert url.startswith("http://127.0.0.1:")  # this machine only, by default
    driver.get(url)
    WebDriverWait(driver, 10).until(lambda x: x.execute_script("return !!window.showattend"))
    console_errors(driver)
    assert driver.find_element(By.ID, "empty").is_displayed()
    photo = ASSETS / "flickr8k_256085101_dog.jpg"

    def upload(path: Path) -> None:
        driver.find_element(By.ID, "file").send_keys(str(path))

    def n_images() -> int:
        return driver.execute_script("return window.showattend.data.images.length")

    upload(photo)
    WebDriverWait(driver, 60).until(lambda x: n_images() == 1)
    shown = driver.execute_script("return window.showattend.shown")
    assert len(shown) == 2 and all(s["text"] for s in shown)
    for s in shown:
        assert len(s["map"]) == 64 and abs(sum(s["map"]) - 1) < 0.05  # a distribution over 8×8
    assert driver.find_element(By.ID, "name").text == photo.name
    words = driver.find_elements(By.CSS_SELECTOR, ".panel[data-model='0'] .word")
    assert len(words) >= 1
    words[-1].click()
    s0 = driver.execute_script("return window.showattend.shown[0]")
    got = heat_alpha(driver, 0)
    want = expected_alpha(np.asarray(s0["map"]).reshape(8, 8), got.shape)
    assert s0["word"] == len(words) - 1 and np.abs(got - want).max() <= 1
    assert "captioned in" in driver.find_element(By.ID, "status").text
    driver.save_screenshot(str(shots / "serve.png"))

    fake = tmp_path / "notes.jpg"
    fake.write_text("shopping list: milk, bread\n")
    upload(fake)
    err = driver.find_element(By.ID, "error")
    WebDriverWait(driver, 30).until(lambda x: err.is_displayed())
    assert err.text.startswith("notes.jpg is not an image this server can read")
    driver.save_screenshot(str(shots / "serve_error.png"))
    big = tmp_path / "big.png"
    big.write_bytes(os.urandom(1_500_000))
    upload(big)
    WebDriverWait(driver, 10).until(lambda x: "big.png is 1.4 MB" in err.text)
    assert "up to 1.0 MB" in err.text and n_images() == 1

    upload(photo)  # the server is still serving after the bad uploads
    WebDriverWait(driver, 60).until(lambda x: n_images() == 2)
    assert not err.is_displayed() and proc.poll() is None
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
    # the only console errors are the browser's notes on the refused upload's status
    errors = console_errors(driver)
    assert all("status of 415" in e for e in errors), errors


# ---------------------------------------------------------------------------- reference boxes


def test_reference_boxes_follow_the_word_and_sort_by_worst_grounding(driver, tmp_path, shots):
    from test_reference_boxes import CAT, DOG_MAN, FLAT, LEFT, TOP_RIGHT, _caption

    caps = [
        _caption("/p/1234_a.png", ["a", "dog", "near", "a", "man"],
                 [FLAT, LEFT, FLAT, FLAT, TOP_RIGHT]),   # mean correctness 0.55
        _caption("/p/5678_y.png", ["a", "dog"], [FLAT, LEFT]),  # no annotations
        _caption("/p/9999_z.png", ["a", "dog"], [FLAT, LEFT]),  # annotated, no named word
        _caption("/p/1234_b.png", ["a", "man"], [FLAT, TOP_RIGHT]),  # 0.3
        _caption("/p/1234_c.png", ["a", "dog"], [FLAT, LEFT]),  # 0.8
    ]
    ents = {"1234_a.png": DOG_MAN, "1234_b.png": DOG_MAN, "1234_c.png": DOG_MAN,
            "9999_z.png": CAT}
    rep = Report.from_captions({"m": caps}, entities=ents)
    path = rep.save(tmp_path / "boxes.html")
    open_report(driver, path)

    sort = Select(driver.find_element(By.ID, "sort"))
    assert "worst grounding first (m)" in [o.text for o in sort.options]
    sort.select_by_value("grounding:0")
    order = [int(x.get_attribute("data-image"))
             for x in driver.find_elements(By.CSS_SELECTOR, "#list .item")]
    assert order == [3, 0, 4, 1, 2]  # worst mean correctness first; no scored word last

    driver.execute_script("window.showattend.select(0)")
    stage = driver.find_element(By.CSS_SELECTOR, ".panel[data-model='0'] .stage")
    legend = driver.find_element(By.CSS_SELECTOR, ".panel[data-model='0'] .legend")
    assert legend.is_displayed() and legend.text == "reference boxes (Flickr30k Entities)"
    words = driver.find_elements(By.CSS_SELECTOR, ".panel[data-model='0'] .word")
    assert [w.text.strip() for w in words] == caps[0].words  # the figure is no part of the text
    figure = driver.execute_script(
        "return getComputedStyle(arguments[0], '::after').content", words[1])
    assert figure == '"0.80"' and "reference boxes 0.800" in words[1].get_attribute("title")

    def ref_rects() -> list[tuple[float, float, float, float]]:
        s = stage.rect
        return [((r["x"] - s["x"]) / s["width"], (r["y"] - s["y"]) / s["height"],
                 r["width"] / s["width"], r["height"] / s["height"])
                for r in (b.rect for b in stage.find_elements(By.CSS_SELECTOR, ".refbox"))]

    words[1].click()  # "dog": the left half of the picture
    assert ref_rects() == [pytest.approx((0, 0, 0.5, 1), abs=0.01)]
    shown = driver.execute_script("return window.showattend.shown[0]")
    assert shown["refBoxes"] == [[0, 0, 20, 40]] and shown["correctness"] == pytest.approx(0.8)
    assert "on its reference boxes 0.80" in driver.find_element(
        By.CSS_SELECTOR, ".panel[data-model='0'] .info").text
    driver.save_screenshot(str(shots / "report_reference_boxes.png"))
    ActionChains(driver).move_to_element(words[4]).perform()  # hover "man": the top-right quarter
    assert ref_rects() == [pytest.approx((0.5, 0, 0.5, 0.5), abs=0.01)]
    ActionChains(driver).move_to_element(words[2]).perform()  # "near" names nothing
    assert ref_rects() == []
    ActionChains(driver).move_to_element(driver.find_element(By.ID, "name")).perform()
    assert ref_rects() == [pytest.approx((0, 0, 0.5, 1), abs=0.01)]  # back to the selected word

    driver.execute_script("window.showattend.select(1)")  # no annotations: no legend, no boxes
    assert not driver.find_element(By.CSS_SELECTOR, ".panel[data-model='0'] .legend").is_displayed()
    assert driver.find_elements(By.CSS_SELECTOR, ".refbox") == []
    assert console_errors(driver) == []


# ---------------------------------------------------------------------------- explain


def test_serve_explain_a_typed_caption_shows_each_words_map(driver, served, soft_hard, shots):
    """On the page: upload a photo, type a caption, see each word's map — the map the API's
    explain gives for the same photo and words (up to the page's uint8 quantisation) — with the
    word the model does not know marked."""
    from showattend.data.images import load_image

    _, soft, _ = soft_hard
    url, proc = served
    driver.get(url)
    WebDriverWait(driver, 10).until(lambda x: x.execute_script("return !!window.showattend"))
    console_errors(driver)
    photo = ASSETS / "flickr8k_256085101_dog.jpg"
    driver.find_element(By.ID, "file").send_keys(str(photo))
    WebDriverWait(driver, 60).until(
        lambda x: x.execute_script("return window.showattend.data.images.length") == 1)
    form = driver.find_element(By.ID, "explain")
    assert form.is_displayed()
    text = "a red zzyzx circle"
    box = driver.find_element(By.ID, "explain-text")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)
    WebDriverWait(driver, 60).until(lambda x: x.execute_script(
        "const r = window.showattend.data.images[0].results[0];"
        "return r.beams[r.beams.length - 1].explained === true"))
    words = driver.find_elements(By.CSS_SELECTOR, ".panel[data-model='0'] .word")
    assert [w.text.strip() for w in words] == text.split()
    unk = driver.find_elements(By.CSS_SELECTOR, ".panel[data-model='0'] .word.unk")
    assert [w.text.strip() for w in unk] == ["zzyzx"]
    assert "zzyzx" in driver.find_element(By.ID, "status").text
    [want] = showattend.load(soft, device="cpu").explain([load_image(photo)], text,
                                                         own_caption=False)
    for t in range(len(words)):
        words[t].click()
        shown = driver.execute_script("return window.showattend.shown[0]")
        assert shown["text"] == text.split()[t]
        np.testing.assert_allclose(shown["map"], want.attention[t].ravel(),
                                   atol=want.attention[t].max() / 510 + 1e-6)
    lis = driver.find_elements(By.CSS_SELECTOR, ".panel[data-model='0'] .beams li.explained")
    assert len(lis) == 1 and lis[0].text.startswith("✎ " + text)
    driver.save_screenshot(str(shots / "serve_explain.png"))
    assert not console_errors(driver)


def test_report_opens_each_reference_caption_explained(driver, report, shots):
    rep, path = report
    open_report(driver, path)
    lis = driver.find_elements(By.CSS_SELECTOR, ".panel[data-model='0'] .beams li.explained")
    refs = rep.entries[0].references
    assert refs and len(lis) == len(refs)
    lis[0].click()
    shown = driver.execute_script("return window.showattend.shown[0]")
    alt = [a for a in rep.entries[0].captions[0].alternatives if a.logp is not None][0]
    assert shown["text"] == alt.words[0] and alt.text == refs[0]
    np.testing.assert_allclose(shown["map"], alt.attention[0].ravel(),
                               atol=alt.attention[0].max() / 510 + 1e-6)
    driver.save_screenshot(str(shots / "report_reference_explained.png"))
    assert not console_errors(driver)
