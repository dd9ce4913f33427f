"""The command line introduces itself: --version, one line per command in --help, and an
example closing every subcommand's help."""

from __future__ import annotations

import pytest

from showattend import __version__
from showattend.cli import EXAMPLES, build_parser, main


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"showattend {__version__}"


def test_every_command_is_listed_and_its_help_ends_with_an_example(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    top = parser.format_help()
    for name, cmd in sub.choices.items():
        assert name in top
        assert name in EXAMPLES, f"{name} has no example"
        text = cmd.format_help().rstrip()
        assert text.endswith(EXAMPLES[name]), name
        assert EXAMPLES[name].startswith(f"showattend {name}")
    assert "--section.key=value" in sub.choices["prepare"].format_help()
