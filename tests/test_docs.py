"""The front door and the pages behind it: every relative link and image in README.md, docs/ and
the model card resolves; the README stays short with the quick start near the top. (Planted
once: a link to docs/photo.md → caught.)"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _pages() -> list[Path]:
    return [ROOT / "README.md", ROOT / "showattend" / "pretrained" / "MODEL_CARD.md",
            *sorted((ROOT / "docs").glob("*.md"))]


def _targets(page: Path) -> list[str]:
    text, out, fenced = page.read_text(encoding="utf-8"), [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            out += LINK.findall(line)
    return out


def test_every_relative_link_and_image_resolves():
    broken = []
    for page in _pages():
        for target in _targets(page):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue  # web addresses, anchors in the same page
            path = target.split("#", 1)[0]
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)} → {target}")
    assert not broken, "broken links:\n" + "\n".join(broken)
    assert len(list((ROOT / "docs").glob("*.md"))) >= 4


def test_readme_is_short_with_the_quick_start_on_top():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250
    top = "\n".join(lines[:40])
    assert "scripts/demo.sh" in top and "scripts/test.sh" in top
