"""Agents: ``async def agent(sandbox, task) -> answer``, and how to name one as a string.

Built in: ``oracle`` (the task's reference solution, ``task.metadata["canonical_solution"]``),
``samples:PATH`` (completions from a JSONL file in the official samples format,
``{"task_id": ..., "completion": ...}``; the n-th sample of a task serves repeat n) and
``module:function`` (any importable async function).
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
from collections import defaultdict
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandboxnb.errors import SandboxnbError

if TYPE_CHECKING:
    from sandboxnb.client import Sandbox
    from sandboxnb.tasks import Task

__all__ = ["Agent", "AgentError", "oracle", "resolve_agent", "samples_agent"]

Agent = Callable[["Sandbox", "Task"], Awaitable[Any]]


_REPEAT: ContextVar[int] = ContextVar("sandboxnb_repeat", default=0)


def current_repeat() -> int:
    """The repeat index of the rollout the calling agent runs in (0 outside a rollout)."""
    return _REPEAT.get()


class AgentError(SandboxnbError, ValueError):
    """An agent could not be resolved or did not follow the agent contract."""


async def oracle(sandbox: Sandbox, task: Task) -> str:
    """Answer with the task's reference solution."""
    try:
        return task.metadata["canonical_solution"]
    except KeyError:
        raise AgentError(f"task {task.id!r} has no canonical_solution for the oracle") from None


def samples_agent(path: str | Path) -> Agent:
    """An agent that answers from a samples JSONL file; repeat ``n`` uses the task's n-th sample."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise AgentError(f"samples file {str(path)!r} cannot be read: {err.strerror}") from None
    samples: dict[str, list[str]] = defaultdict(list)
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            samples[str(row["task_id"])].append(str(row["completion"]))
        except (ValueError, KeyError, TypeError):
            raise AgentError(
                f"{path}:{number}: expected a JSON object with task_id and completion"
            ) from None

    async def answer_from_samples(sandbox: Sandbox, task: Task) -> str:
        repeat = current_repeat()
        found = samples.get(task.id, [])
        if repeat >= len(found):
            raise AgentError(
                f"{path} has {len(found)} sample(s) for task {task.id!r}, none for repeat {repeat}"
            )
        return found[repeat]

    answer_from_samples.__name__ = f"samples:{path}"
    return answer_from_samples


def resolve_agent(agent: str | Agent) -> Agent:
    """Turn ``"oracle"``, ``"samples:PATH"``, ``"module:function"`` or a callable into an agent."""
    if not isinstance(agent, str):
        if not callable(agent):
            raise AgentError(f"agent = {agent!r}: expected an async function or a name")
        _require_async(agent, repr(agent))
        return agent
    if agent == "oracle":
        return oracle
    if agent.startswith("samples:"):
        return samples_agent(agent.removeprefix("samples:"))
    module_name, sep, attr = agent.partition(":")
    if not sep or not module_name or not attr:
        from sandboxnb.options import did_you_mean

        raise AgentError(
            f"agent = {agent!r}{did_you_mean(agent, ['oracle'])}: expected 'oracle', "
            "'samples:PATH' or 'module:function'"
        )
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # let `module:function` name a file in the working directory
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise AgentError(f"agent = {agent!r}: cannot import {module_name!r}: {err}") from None
    try:
        fn = getattr(module, attr)
    except AttributeError:
        raise AgentError(f"agent = {agent!r}: module {module_name!r} has no {attr!r}") from None
    _require_async(fn, agent)
    return fn


def _require_async(fn: Any, name: str) -> None:
    target = fn if inspect.isfunction(fn) or inspect.ismethod(fn) else type(fn).__call__
    if not inspect.iscoroutinefunction(target):
        raise AgentError(
            f"agent = {name}: must be an async function `async def agent(sandbox, task)`"
        )
