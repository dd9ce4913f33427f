"""Fixtures of the inspection tests: a tiny soft and a tiny hard run on the same built-in data."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import write_config


@pytest.fixture(scope="session")
def soft_hard(trained) -> tuple[Path, Path, Path]:
    """(data dir, soft run, hard run): the session's soft run plus a hard run on its data."""
    from showattend.cli import main

    tmp, soft = trained
    cfg = write_config(tmp, kind="hard", data=tmp / "data")
    hard = tmp / "run_hard"
    if not (hard / "best.pt").exists():
        assert main(["-q", "train", "--config", str(cfg)]) == 0
    return tmp / "data", soft, hard


@pytest.fixture(scope="session")
def test_images(soft_hard) -> list[Path]:
    data, _, _ = soft_hard
    return sorted((data / "images" / "test").glob("*.png"))
