"""The docs tell the truth: README.md and docs/*.md against the code, in a second or two.

- docs/cli.md is what scripts/cli_docs.py generates from the commands' `--help`, at any
  terminal width or colour setting;
- every `localmix SUBCOMMAND` in a shell code block or an inline code span is a real
  subcommand, and every flag written after it is one of that subcommand's options, as the
  click command objects declare them;
- every repository path in backticks (`localmix/...`, `tests/...`, ...) exists;
- every relative link between the pages resolves, its #anchor to a heading of the target;
- the architecture table names each package's modules, all of them and only those;
- README.md stays a front page (under 200 lines), and its test command is the one CI runs.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import typer
from typer import rich_utils

from localmix.frontends.cli import app

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
WRITTEN = [p for p in PAGES if p.name != "cli.md"]  # cli.md is generated, and checked whole
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```", re.M | re.S)
SHELL = {"", "sh", "bash", "shell", "console"}
PATH_PREFIXES = ("localmix/", "tests/", "benchmarks/", "scripts/", "docs/", ".ci/")


def _cli_docs():
    spec = importlib.util.spec_from_file_location("cli_docs", REPO / "scripts" / "cli_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _name(page: Path) -> str:
    return str(page.relative_to(REPO))


def _prose(text: str) -> str:
    """The page without its fenced code blocks."""
    return FENCE.sub("", text)


def _shell_blocks(text: str) -> list[str]:
    return [body for info, body in FENCE.findall(text) if info.strip() in SHELL]


def _inline_code(text: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", _prose(text).replace("\n", " "))


# --- docs/cli.md -----------------------------------------------------------------------------

def test_cli_reference_is_generated_from_help():
    text = (REPO / "docs" / "cli.md").read_text(encoding="utf-8")
    assert text == _cli_docs().render(), "docs/cli.md is out of date: run scripts/cli_docs.py > docs/cli.md"


def test_cli_reference_does_not_depend_on_the_terminal(monkeypatch):
    cli_docs = _cli_docs()
    expected = cli_docs.render()
    # what typer read from a narrow, coloured terminal at import, and what rich reads at render
    monkeypatch.setattr(rich_utils, "MAX_WIDTH", 40)
    monkeypatch.setattr(rich_utils, "FORCE_TERMINAL", True)
    monkeypatch.setattr(rich_utils, "COLOR_SYSTEM", "truecolor")
    monkeypatch.setenv("COLUMNS", "40")
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.setenv("FORCE_COLOR", "1")
    assert cli_docs.render() == expected
    assert "\x1b[" not in expected


# --- commands and flags ----------------------------------------------------------------------

def _options() -> dict[str, set[str]]:
    """Every subcommand's option names (`--type`, `-t`, `--no-repack`, ...), from click's objects."""
    group = typer.main.get_command(app)
    out = {}
    for name, command in group.commands.items():
        ctx = typer.Context(command, info_name=name)
        names = set(command.get_help_option_names(ctx))
        for param in command.params:
            names.update(param.opts)
            names.update(param.secondary_opts)
        out[name] = names
    for option in group.get_help_option_names(typer.Context(group, info_name="localmix")):
        out[option] = set()  # `localmix --help`: the program's own options, with no subcommand
    return out


def _substitutions(line: str) -> list[str]:
    """`line` and each `$(...)` in it, innermost first, each with its inner ones replaced by a word."""
    out = []
    while True:
        m = re.search(r"\$\(([^()]*)\)", line)
        if not m:
            return out + [line]
        out.append(m.group(1))
        line = line[:m.start()] + "SUBST" + line[m.end():]


def _invocations(command_line: str) -> list[tuple[str, list[str]]]:
    """(subcommand, flags) of each `localmix SUBCOMMAND ...` in a shell line."""
    found = []
    for part in _substitutions(command_line):
        for segment in re.split(r"\|\||&&|[|;]", part):
            try:
                words = shlex.split(segment, comments=True)
            except ValueError:
                words = segment.split()
            at = next((i for i, w in enumerate(words) if w.rsplit("/", 1)[-1] == "localmix"), None)
            if at is None or at + 1 >= len(words):
                continue
            flags = []
            for word in words[at + 2:]:
                word = word.strip("[]")
                for flag in word.split("/") if word.startswith("-") else []:
                    flag = flag.split("=", 1)[0]
                    if re.fullmatch(r"--?[A-Za-z][\w-]*", flag):
                        flags.append(flag)
            found.append((words[at + 1], flags))
    return found


def _commands_written(page: Path) -> list[tuple[str, str, list[str]]]:
    """(the line, subcommand, flags) of every localmix command in the page's shell blocks and
    inline code."""
    text = page.read_text(encoding="utf-8")
    lines = [line for body in _shell_blocks(text) for line in body.replace("\\\n", " ").splitlines()]
    lines += [span for span in _inline_code(text) if span.startswith("localmix ")]
    return [(line, sub, flags) for line in lines for sub, flags in _invocations(line)]


@pytest.mark.parametrize("page", WRITTEN, ids=_name)
def test_commands_and_flags_exist(page):
    options = _options()
    wrong = []
    for line, sub, flags in _commands_written(page):
        if sub not in options:
            wrong.append(f"{line!r}: no subcommand {sub!r}")
            continue
        wrong += [f"{line!r}: `localmix {sub}` has no option {flag}" for flag in flags if flag not in options[sub]]
    assert not wrong, "\n".join(wrong)


def test_the_command_check_reads_what_the_pages_hold():
    """The parser sees nested and piped commands, and the README's everyday commands."""
    assert _invocations('localmix quantize "$(localmix pull REPO)" out.gguf --type Q3_K_M') == [
        ("pull", []), ("quantize", ["--type"])]
    assert _invocations('cat notes.txt | .venv/bin/localmix run m.gguf "Hi" --json  # --not-a-flag') == [
        ("run", ["--json"])]
    assert _invocations("localmix run M [--repack/--no-repack] [--ctx=512]") == [
        ("run", ["--repack", "--no-repack", "--ctx"])]
    seen = {sub for _, sub, _ in _commands_written(REPO / "README.md")}
    assert {"demo", "pull", "ls", "rm", "quantize", "chat", "run", "serve"} <= seen


# --- paths and links -------------------------------------------------------------------------

def _paths(page: Path) -> set[str]:
    """Repository paths the page names: whole inline code spans, and words of its shell blocks."""
    text = page.read_text(encoding="utf-8")
    spans = {s.split("::")[0] for s in _inline_code(text)}
    words = {w for body in _shell_blocks(text) for w in re.split(r"[\s\"'()=]+", body)
             if not w.startswith("docs/")}  # a command's output may be a docs/ file yet to be written
    return {p for p in spans | words if p.startswith(PATH_PREFIXES) and re.fullmatch(r"[\w./-]+", p)}


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_paths_exist(page):
    missing = sorted(p for p in _paths(page) if not (REPO / p).exists())
    assert not missing, f"{_name(page)} names paths that do not exist: {missing}"


def _anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the page's headings."""
    anchors, seen = set(), {}
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", _prose(page.read_text(encoding="utf-8")), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_relative_links_resolve(page):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):
            continue  # http:, https:, mailto:
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    assert not broken, f"{_name(page)}: " + "; ".join(broken)


def test_the_link_check_makes_githubs_anchors(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# `quantize --fit` against llama.cpp's mix\n## Hugging Face checkpoint → GGUF\n## A\n## A\n"
                    "```sh\n# not a heading\n```\n")
    assert _anchors(page) == {"quantize---fit-against-llamacpps-mix", "hugging-face-checkpoint--gguf", "a", "a-1"}


# --- the architecture table, the front page ----------------------------------------------------

def test_architecture_table_names_every_module():
    """Each `localmix/PACKAGE/` row lists that package's modules, every one and no other."""
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `(localmix/[\w/]+/)` \|[^|]*\|([^\n]*)\|$", text, re.M)
    assert len(rows) >= 8
    wrong = []
    for package, modules in rows:
        named = set(re.findall(r"`(\w+)`", modules))
        present = {p.stem for p in (REPO / package).glob("*.py") if p.stem != "__init__"}
        if named != present:
            wrong.append(f"{package}: missing {sorted(present - named)}, no such module {sorted(named - present)}")
    assert not wrong, "docs/architecture.md's table is out of date:\n" + "\n".join(wrong)


def test_readme_is_a_front_page():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    blocks = _shell_blocks(readme)
    assert blocks[0].strip() == "scripts/setup && .venv/bin/localmix demo"
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert blocks[1].strip() in ci, "the README's test command and .ci/run differ"
    for page in WRITTEN[1:]:
        assert f"(docs/{page.name})" in readme, f"README.md does not link docs/{page.name}"
    assert "(docs/cli.md)" in readme
