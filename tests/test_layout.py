"""The package's layout, read from its source (nothing is imported): no module uses another
module's private names, each package's docstring lists its modules (as `name.py`, a
subpackage as `name/`) and names none that is not there, and every module opens with a
docstring that says what it is for."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "localmix"


def dotted(path: Path) -> str:
    """localmix/runtime/prompt.py -> localmix.runtime.prompt; a package's __init__.py -> the package."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


FILES = sorted(PACKAGE.rglob("*.py"))
MODULES = {dotted(f): f for f in FILES}
PACKAGES = sorted(f.parent for f in FILES if f.name == "__init__.py")


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"


def private_uses(path: Path, source: str | None = None) -> list[str]:
    """Each place where the module at `path` (its text, or `source`) takes a private name from
    another localmix module: `from localmix.x import _y`, `import localmix._x`, or `x._y` with
    `x` a localmix module."""
    here = dotted(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8") if source is None else source, str(path))
    found, bound = [], {}  # bound: a name in this file -> the localmix module it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from .x import y, from .. import y
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            if base.split(".")[0] != "localmix":
                continue
            for alias in node.names:
                name = f"{base}.{alias.name}"
                if any(private(part) for part in name.split(".")):
                    found.append(f"{where(path, node)}: imports {name}, a private name of another module")
                if name in MODULES:
                    bound[alias.asname or alias.name] = name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != "localmix":
                    continue
                if any(private(part) for part in alias.name.split(".")):
                    found.append(f"{where(path, node)}: imports {alias.name}, a private module")
                if alias.asname:
                    bound[alias.asname] = alias.name
                else:
                    bound["localmix"] = "localmix"

    def module_of(node: ast.AST) -> str | None:
        if isinstance(node, ast.Name):
            return bound.get(node.id)
        if isinstance(node, ast.Attribute):
            base = module_of(node.value)
            if base and f"{base}.{node.attr}" in MODULES:
                return f"{base}.{node.attr}"
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private(node.attr):
            owner = module_of(node.value)
            if owner and owner != here:
                found.append(f"{where(path, node)}: uses {owner}.{node.attr}, a private name of another module")
    return found


def test_no_module_uses_another_modules_private_names():
    found = [line for f in FILES for line in private_uses(f)]
    assert not found, "give these a public name (or move them to the module that uses them):\n" + "\n".join(found)


def test_the_check_sees_each_kind_of_private_use():
    """The walk above finds what it is for: a made-up module, read as if it were in the package."""
    source = ("from localmix.frontends.server.openai import _jobs, check_params\n"
              "from . import openai as api\n"
              "from .. import render\n"
              "import localmix.runtime.template\n"
              "import localmix._hidden\n"
              "api._stream(); render.stats_line(); render._x; localmix.runtime.template._checked([])\n"
              "api.__name__\n")
    found = private_uses(PACKAGE / "frontends" / "server" / "made_up.py", source)
    assert sorted(line.split(": ", 1)[1] for line in found) == [
        "imports localmix._hidden, a private module",
        "imports localmix.frontends.server.openai._jobs, a private name of another module",
        "uses localmix.frontends.render._x, a private name of another module",
        "uses localmix.frontends.server.openai._stream, a private name of another module",
        "uses localmix.runtime.template._checked, a private name of another module",
    ]


def members(package: Path) -> dict[str, str]:
    """What a package holds, as its docstring must name it: {"prompt.py": "module", "server/": "package"}."""
    out = {f.name: "module" for f in package.glob("*.py") if not f.stem.startswith("__")}
    out.update({d.name + "/": "package" for d in package.iterdir() if (d / "__init__.py").is_file()})
    return out


def named(docstring: str) -> set[str]:
    """The modules and folders a docstring names: `name.py` and `name/`, or a path (`runtime/stream.py`,
    from the package, from localmix/ or from the repository)."""
    files = re.findall(r"(?<![\w./-])((?:\w+/)*\w+\.py)\b", docstring)
    folders = re.findall(r"(?<![\w./-])(\w+/)(?![\w/])", docstring)
    return set(files) | set(folders)


def test_each_package_docstring_lists_its_modules():
    problems = []
    for package in PACKAGES:
        init = (package / "__init__.py").relative_to(PACKAGE.parent)
        docstring = ast.get_docstring(ast.parse((package / "__init__.py").read_text(encoding="utf-8"))) or ""
        names = named(docstring)
        for member, kind in sorted(members(package).items()):
            if member not in names:
                problems.append(f"{init}: the docstring does not list {member} (a {kind} of {dotted(package / '__init__.py')})")
        for name in sorted(names):
            if not any((base / name).exists() for base in (package, PACKAGE, PACKAGE.parent)):
                problems.append(f"{init}: the docstring names {name}, which is not in {package.relative_to(PACKAGE.parent)}/")
    assert not problems, "\n".join(problems)


def test_every_module_opens_with_a_docstring():
    missing = [str(f.relative_to(PACKAGE.parent)) for f in FILES if not ast.get_docstring(ast.parse(f.read_bytes()))]
    assert not missing, "these modules do not say what they are for:\n" + "\n".join(missing)
