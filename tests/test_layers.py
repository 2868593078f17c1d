"""The package's layering: no import cycles anywhere, and the core (everything outside
``sandboxnb.notebook``) never imports the notebook layer, IPython or ipywidgets."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sandboxnb"
NOTEBOOK_ONLY = ("sandboxnb.notebook", "IPython", "ipywidgets", "ipykernel", "nest_asyncio2")


def modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package) for every module of sandboxnb."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level_imports(body: list[ast.stmt]):
    """Import statements executed when the module is imported (not in functions or classes,
    not under ``if TYPE_CHECKING``)."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _module_level_imports(node.body)
            yield from _module_level_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody,
                          *(handler.body for handler in node.handlers)):
                yield from _module_level_imports(block)
        elif isinstance(node, ast.With):
            yield from _module_level_imports(node.body)


def _imported_names(node: ast.Import | ast.ImportFrom, package: str, known) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:  # relative: resolve against the importing module's package
        base = package.split(".")[: len(package.split(".")) - node.level + 1]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    return [f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names]


def import_graph() -> dict[str, set[str]]:
    """Module -> the sandboxnb modules its import executes, parents of submodules included
    (importing ``a.b.c`` runs ``a`` and ``a.b`` first), the module's own ancestors excluded."""
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in known.items():
        package = name if is_package else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in _module_level_imports(ast.parse(path.read_text()).body):
            for target in _imported_names(node, package, known):
                while target and target not in known:  # `from m import attr` -> m
                    target = target.rpartition(".")[0]
                while target:
                    if target != name and not name.startswith(target + "."):
                        edges.add(target)
                    target = target.rpartition(".")[0]
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle a depth-first search meets (each as a path that closes on its start)."""
    state: dict[str, int] = {}
    path: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for succ in sorted(graph.get(node, ())):
            if state.get(succ) == 1:
                cycles.append([*path[path.index(succ):], succ])
            elif succ not in state:
                visit(succ)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_cycle_finder_finds_cycles():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_the_import_graph_is_built_from_every_module():
    graph = import_graph()
    assert {"sandboxnb", "sandboxnb.scheduler", "sandboxnb.plan", "sandboxnb.runner",
            "sandboxnb.results", "sandboxnb.journal", "sandboxnb.notebook.magics"} <= set(graph)
    assert {"sandboxnb.plan", "sandboxnb.runner", "sandboxnb.results"} <= graph[
        "sandboxnb.scheduler"]


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_core_never_names_the_notebook_layer():
    """No core module imports the notebook layer, IPython or ipywidgets, even lazily; the
    package root only forwards ``%load_ext`` and the lazy ``launcher``/``monitor`` names."""
    offenders = []
    for name, (path, _is_package) in modules().items():
        if name == "sandboxnb" or name.startswith("sandboxnb.notebook"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                targets = [a.name for a in node.names] if isinstance(node, ast.Import) else [
                    node.module or ""]
                offenders += [f"{name}: {t}" for t in targets if t.startswith(NOTEBOOK_ONLY)]
    assert not offenders


def test_a_full_local_run_imports_no_notebook_module(tmp_path):
    """The engine modules, a whole run on the local provider (progress bar included), loading
    its journal and building DataFrames leave IPython, ipywidgets and sandboxnb.notebook
    unimported."""
    script = textwrap.dedent(f"""
        import asyncio, json, sys
        import sandboxnb.journal, sandboxnb.plan, sandboxnb.results, sandboxnb.runner
        import sandboxnb.scheduler, sandboxnb.tasksets
        import sandboxnb

        TASKS = [{{"id": f"t{{i}}", "prompt": "x", "grader": {{"type": "match", "expected": "x"}}}}
                 for i in range(3)]

        async def agent(sandbox, task):
            return (await sandbox.exec(["sh", "-c", "printf x"])).stdout

        async def main():
            run = await sandboxnb.run(TASKS, agent, "local", max_concurrent=2,
                                      journal={str(tmp_path / "j.jsonl")!r}, progress=True)
            assert run.counts() == {{"ok": 3}}, run.summary()
            run.to_pandas()
            assert repr(run).startswith("<Run ")
            loaded = sandboxnb.load(run.journal_path)
            loaded.to_pandas()
            sandboxnb.Taskset.load("humaneval")

        asyncio.run(main())
        found = sorted(m for m in sys.modules if m.startswith({NOTEBOOK_ONLY!r}))
        print(json.dumps(found))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
