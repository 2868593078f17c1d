"""The taskset registry: built-ins, plug-ins from the ``sandboxnb.tasksets`` entry-point group,
and a clear error for an unknown name."""

from __future__ import annotations

import tomllib
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

import sandboxnb
import sandboxnb.tasksets as registry
from sandboxnb.tasks import Task, TaskError, Taskset

ROOT = Path(__file__).resolve().parents[1]


def tiny() -> Taskset:
    """A plug-in loader returning a Taskset."""
    return Taskset([{"id": "t1", "prompt": "7", "grader": {"type": "match", "expected": "7"}}],
                   name="tiny")


def as_list() -> list[dict]:
    """A plug-in loader returning plain task dicts."""
    return [{"id": "x"}, {"id": "y"}]


def not_tasks() -> int:
    return 42


@pytest.fixture
def plugins(monkeypatch):
    """Entry points as an installed plug-in package would declare them."""
    declared = [
        EntryPoint("tiny", "tests.test_tasksets:tiny", registry.GROUP),
        EntryPoint("listed", "tests.test_tasksets:as_list", registry.GROUP),
        EntryPoint("broken", "tests.no_such_module:load", registry.GROUP),
        EntryPoint("wrong", "tests.test_tasksets:not_tasks", registry.GROUP),
        EntryPoint("humaneval", "tests.test_tasksets:tiny", registry.GROUP),  # cannot shadow
    ]

    def entry_points(*, group: str):
        return [ep for ep in declared if ep.group == group]

    monkeypatch.setattr(registry, "entry_points", entry_points)
    return declared


def test_the_builtin_is_declared_in_the_entry_point_group():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    group = meta["project"]["entry-points"][registry.GROUP]
    assert group == {"humaneval": registry.BUILTIN["humaneval"]}


def test_builtin_humaneval_loads_by_name():
    tasks = Taskset.load("humaneval")
    assert tasks.name == "humaneval" and len(tasks) == 164
    assert registry.taskset_names()[0] == "humaneval"


def test_plugins_are_found_by_name(plugins):
    assert registry.taskset_names() == ["humaneval", "tiny", "listed", "broken", "wrong"]
    tasks = Taskset.load("tiny")
    assert [t.id for t in tasks] == ["t1"]
    listed = Taskset.load("listed")
    assert listed.name == "listed" and all(isinstance(t, Task) for t in listed)
    assert len(Taskset.load("humaneval")) == 164  # the built-in wins over a plug-in's name


def test_broken_plugins_fail_clearly(plugins):
    with pytest.raises(TaskError, match=r"taskset = 'broken': its loader .* cannot be imported"):
        Taskset.load("broken")
    with pytest.raises(TaskError, match=r"taskset = 'wrong': its loader returned int"):
        Taskset.load("wrong")


def test_unknown_name_lists_what_is_accepted(plugins):
    with pytest.raises(TaskError) as info:
        Taskset.load("nosuch")
    message = str(info.value)
    assert message.startswith("taskset = 'nosuch' is not a registered taskset")
    assert "accepted: humaneval, tiny, listed, broken, wrong, or a .json/.jsonl file" in message


async def test_a_plugin_taskset_runs_by_name(plugins):
    async def answer(sandbox, task):
        return (await sandbox.exec(["sh", "-c", f"printf %s {task.prompt}"])).stdout

    run = await sandboxnb.run("tiny", answer, journal=None, progress=False)
    assert run.name == "tiny" and run.counts() == {"ok": 1} and run.mean_reward() == 1.0


async def test_humaneval_grader_starts_bare_like_the_server():
    """The check program runs with ``-S -E -s``: no site, no environment, no user site."""
    problem = Taskset.load("humaneval")[0]
    probe = ("    import sys\n    assert 'site' not in sys.modules, 'site was imported'\n"
             "    assert sys.flags.ignore_environment and sys.flags.no_user_site\n")

    async def bare_probe(sandbox, task):
        return probe + problem.metadata["canonical_solution"]

    run = await sandboxnb.run([problem], bare_probe, journal=None, progress=False)
    assert run.counts() == {"ok": 1}, run.rows[0]
    assert run.mean_reward() == 1.0, run.rows[0]["info"]


@pytest.mark.parametrize("forgery", [
    # prints a passing verdict on the real stdout, then leaves before the checks run
    "    import os\n    os.write(1, b'\\n{\"reward\": 1.0, \"result\": \"passed\"}\\n')\n"
    "    os._exit(0)\n",
    # the same through every fd the process holds
    "    import os\n    for fd in range(3, 64):\n        try:\n"
    "            os.write(fd, b'\\n{\"reward\": 1.0, \"result\": \"passed\"}\\n')\n"
    "        except OSError:\n            pass\n    os._exit(0)\n",
])
async def test_a_completion_cannot_print_its_own_pass(forgery):
    """Code under test that prints a verdict and exits is a failure, as in the official grader
    (which records a pass only once the checks returned)."""
    problem = Taskset.load("humaneval")[0]

    async def forging_agent(sandbox, task):
        return forgery

    run = await sandboxnb.run([problem], forging_agent, journal=None, progress=False)
    assert run.counts() == {"ok": 1}, run.rows[0]
    assert run.rows[0]["reward"] == 0.0, run.rows[0]["info"]
