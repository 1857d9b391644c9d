"""Every option's help reads in `--help` as it is written: nothing cut by the help renderer
(typer's rich markup took "[default: ...]" for a tag and left "Context length in tokens .")."""

from __future__ import annotations

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
