"""Every option's help reads in `--help` as it is written: nothing cut by the help renderer
(typer's rich markup took "[default: ...]" for a tag and left "Context length in tokens .")."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from cli_docs import command_names, help_text

from localmix.frontends.cli import app

WIDE = 400  # wide enough that no help text wraps


def _helps(name: str) -> list[str]:
    group = typer.main.get_command(app)
    command = group.get_command(typer.Context(group), name)
    return [p.help for p in command.params if getattr(p, "help", None)]


@pytest.mark.parametrize("name", command_names())
def test_every_option_help_is_shown_whole(name):
    shown = " ".join(help_text([name], width=WIDE).split())
    for text in _helps(name):
        assert " ".join(text.replace("\\[", "[").split()) in shown, (name, text)
    assert " ." not in shown.replace(" .dat", ""), name


@pytest.mark.parametrize("name", command_names())
def test_the_description_wraps_at_the_terminal_width(name):
    """A command's description is re-wrapped to the terminal: in 60 columns no line of a
    paragraph ends far short of the width while the paragraph goes on (typer keeps the
    docstring's own line breaks unless the paragraphs are joined)."""
    width = 60
    text = help_text([name], width=width)
    description = text.split("╭", 1)[0].split("Usage:", 1)[1].split("\n", 1)[1]
    for paragraph in re.split(r"\n\s*\n", description):
        lines = [line.strip() for line in paragraph.strip("\n").splitlines() if line.strip()]
        for line, following in zip(lines, lines[1:]):
            assert len(line) + 1 + len(following.split()[0]) > width - 4, (name, line)
