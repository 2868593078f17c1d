"""The plan of a run: every (task, repeat) to roll out with its effective config, validated.

:func:`make_plan` resolves and checks everything a run needs (taskset, agent, provider, config
for every task, concurrency, repeats, deadline, journal) and raises before any sandbox starts;
each error names the field, the value and what is accepted. Resuming a journal keeps its rows and
plans only the (task, repeat) pairs it does not hold yet (a ``cancelled`` row is planned again).
A journal's header (:func:`journal_header`) records what its run was; resuming a journal of
another run (other taskset, changed tasks, agent, runtime, config or repeats) is refused naming
each difference, unless ``resume="force"``; growing the run (more tasks, more repeats) is not a
difference. Making a plan has no side effect on disk: the journal is opened when the run starts;
the plan records what the journal was (:data:`~sandboxnb.journal.Stamp`), and a journal another
run wrote in between is refused then. A journal another run is writing is refused at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sandboxnb.agents import Agent, resolve_agent
from sandboxnb.config import ConfigError, RuntimeConfig, merge_config
from sandboxnb.journal import UNCHECKED, Stamp, snapshot
from sandboxnb.options import parse_count
from sandboxnb.providers import Provider, get_provider
from sandboxnb.results import latest_rows
from sandboxnb.tasks import Task, Taskset

__all__ = [
    "Plan",
    "PlannedRollout",
    "agent_name",
    "expand",
    "journal_header",
    "make_plan",
    "resumable_rows",
    "tasks_fingerprint",
]

log = logging.getLogger("sandboxnb.plan")
#: header fields that must match for a journal to be resumed (version and time may differ)
_SAME_RUN = ("taskset", "fingerprint", "agent", "runtime", "config", "repeats")

TasksetLike = str | Path | Taskset | Iterable[Task | Mapping[str, Any]]


@dataclass(frozen=True)
class PlannedRollout:
    """One rollout to run: a task, its repeat index and the config its sandbox gets."""

    task: Task
    repeat: int
    config: RuntimeConfig


@dataclass(frozen=True)
class Plan:
    """Everything a run executes, validated. ``previous`` are the rows of a resumed journal."""

    name: str
    rollouts: tuple[PlannedRollout, ...]
    agent: Agent
    provider: Provider
    owns_provider: bool
    max_concurrent: int
    timeout_s: float | None = None
    journal: Path | None = None
    previous: tuple[dict[str, Any], ...] = ()
    #: the header to write when the journal opens (None: the journal already says what it is)
    header: dict[str, Any] | None = None
    #: what the journal was when planned (the journal refuses to open if written since)
    journal_stamp: Stamp | str = UNCHECKED

    @property
    def total(self) -> int:
        """Rollouts of the whole run: those already journaled plus those to run."""
        return len(self.rollouts) + len(self.previous)


def expand(
    taskset: Iterable[Task],
    provider: Provider,
    base: RuntimeConfig,
    repeats: int,
    skip: Iterable[tuple[str, int]] = (),
) -> list[PlannedRollout]:
    """Every (task, repeat) not in ``skip``, in taskset order, with the task's overrides merged
    into ``base`` and checked against what ``provider`` honours."""
    skip = set(skip)
    planned = []
    for task in taskset:
        try:
            config = provider.check(task.effective_config(base))
        except ConfigError as err:
            if task.runtime:  # name the task whose overrides made the config invalid
                raise ConfigError(f"task {task.id!r}: {err}") from err
            raise
        planned += [
            PlannedRollout(task, repeat, config)
            for repeat in range(repeats)
            if (task.id, repeat) not in skip
        ]
    return planned


def resumable_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of a journal a resumed run keeps: the latest row of every finished rollout (ok,
    error, timeout; see :func:`~sandboxnb.results.latest_rows`); cancelled rollouts run again."""
    return [row for row in latest_rows(rows) if row.get("status") != "cancelled"]


def make_plan(
    taskset: TasksetLike,
    agent: str | Agent,
    runtime: str | Provider = "local",
    *,
    config: RuntimeConfig | Mapping[str, Any] | None = None,
    max_concurrent: int = 8,
    repeats: int = 1,
    timeout_s: float | None = None,
    journal: str | Path | None = "auto",
    resume: bool | str = False,
) -> Plan:
    """Validate a run and plan its rollouts (see :func:`sandboxnb.run` for the arguments)."""
    if resume not in (True, False, "force") or (isinstance(resume, int | float) and \
            not isinstance(resume, bool)):
        raise ConfigError(f"resume = {resume!r}: expected True, False or 'force' (continue a "
                          "journal even though it was written by another run)")
    max_concurrent = parse_count(max_concurrent, "max_concurrent")
    repeats = parse_count(repeats, "repeats")
    if timeout_s is not None and (
        isinstance(timeout_s, bool)
        or not isinstance(timeout_s, int | float)
        or not math.isfinite(timeout_s)
        or timeout_s <= 0
    ):
        raise ConfigError(f"timeout_s = {timeout_s!r}: expected a number of seconds > 0 or None")
    tasks = Taskset.load(taskset)
    _check_tasks(tasks)
    agent_fn = resolve_agent(agent)
    base = merge_config(RuntimeConfig(), config)
    provider = get_provider(runtime)
    path = _journal_path(journal, resume, tasks.name)
    header: dict[str, Any] | None = journal_header(tasks, agent, provider, base, repeats)
    previous: list[dict[str, Any]] = []
    old_header, rows, stamp = snapshot(path) if path is not None else (None, [], None)
    if stamp is not None:
        if not resume:
            raise FileExistsError(
                f"journal = {str(path)!r} already holds results; pass resume=True "
                "(CLI: --resume) to continue it, or choose a new path"
            )
        previous = resumable_rows(rows)
        if old_header is not None:
            changed, grown = _differences(old_header, header)
            if changed and resume != "force":
                raise ConfigError(
                    f"journal = {str(path)!r} belongs to another run: "
                    f"{'; '.join(changed)}. Resume it with the run it was written by, "
                    "choose a new journal path (CLI: --journal PATH), or pass resume='force' "
                    "(CLI: --force-resume) to continue it anyway")
            if grown:
                log.info("journal %s: the resumed run grows it: %s", path, "; ".join(grown))
            if not (changed or grown):
                header = None  # the journal already records this run
            if old_header.get("sandboxnb_version") != header_version():
                log.info("journal %s was written by sandboxnb %s", path,
                         old_header.get("sandboxnb_version"))
        _check_same_run(path, previous, tasks, repeats)
    done = {(row.get("task_id"), _as_int(row.get("repeat"))) for row in previous}
    return Plan(
        name=tasks.name,
        rollouts=tuple(expand(tasks, provider, base, repeats, done)),
        agent=agent_fn,
        provider=provider,
        owns_provider=not isinstance(runtime, Provider),
        max_concurrent=max_concurrent,
        timeout_s=timeout_s,
        journal=path,
        previous=tuple(previous),
        header=header if path is not None else None,
        journal_stamp=stamp,
    )


def header_version() -> str:
    from sandboxnb import __version__

    return __version__


def journal_header(tasks: Taskset, agent: str | Agent, provider: Provider,
                   config: RuntimeConfig, repeats: int) -> dict[str, Any]:
    """What a run is, as its journal's first line records it (see :mod:`sandboxnb.journal`)."""
    return {
        "taskset": tasks.name,
        "tasks": len(tasks),
        "fingerprint": tasks_fingerprint(tasks),
        "task_digests": task_digests(tasks),
        "agent": agent_name(agent),
        "runtime": provider.name,
        "config": config.model_dump(mode="json"),
        "repeats": repeats,
        "sandboxnb_version": header_version(),
        "created_at": datetime.now(UTC).isoformat(),
    }


def _canonical(task: Task) -> str:
    grader = task.grader
    return json.dumps(
        {
            "id": task.id,
            "prompt": task.prompt,
            "setup": task.setup,
            "files": task.files,
            "runtime": task.runtime,
            "grader": grader.model_dump() if hasattr(grader, "model_dump")
            else None if grader is None else _stable(grader),
            "metadata": task.metadata,
        },
        sort_keys=True, separators=(",", ":"), default=_stable, ensure_ascii=False,
    )


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def tasks_fingerprint(tasks: Iterable[Task]) -> str:
    """``sha256:...`` over a canonical dump of every task's id, prompt, setup, files, runtime
    overrides, grader and metadata, in order: it changes when any task does."""
    return "sha256:" + _sha256("[" + ",".join(_canonical(task) for task in tasks) + "]")


def task_digests(tasks: Iterable[Task]) -> dict[str, str]:
    """Task id -> a short digest of that task's canonical dump (to say which task changed)."""
    return {task.id: _sha256(_canonical(task))[:16] for task in tasks}


def _stable(value: Any) -> str:
    """A text for a value JSON cannot hold that is the same in every process (no addresses)."""
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '?')}:{value.__qualname__}"
    text = str(value)
    return f"<{type(value).__module__}.{type(value).__qualname__}>" if " at 0x" in text else text


def agent_name(agent: str | Agent) -> str:
    """How a header names an agent: its string as given, or ``module:qualname``."""
    if isinstance(agent, str):
        return agent
    name = getattr(agent, "__name__", "")
    if name.startswith("samples:"):  # a samples agent names its file
        return name
    return _stable(agent) if hasattr(agent, "__qualname__") else _stable(type(agent))


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """What differs between a journal's header and this run's, in words: the changes that make
    it another run, and the ways this run only grows it (tasks added, more repeats)."""
    changed: list[str] = []
    grown: list[str] = []
    for key in _SAME_RUN:
        before, now = old.get(key), new.get(key)
        if before == now:
            continue
        if key == "fingerprint":
            _task_changes(old, new, changed, grown)
        elif key == "config":
            changed += [f"config {field} {a!r} vs {b!r}"
                        for field, (a, b) in _config_changes(before, now).items()]
        elif key == "repeats" and isinstance(before, int) and isinstance(now, int) and \
                before < now:
            grown.append(f"repeats {before} -> {now}")
        else:
            changed.append(f"{key} {before!r} vs {now!r}")
    return changed, grown


def _task_changes(old: Mapping[str, Any], new: Mapping[str, Any], changed: list[str],
                  grown: list[str]) -> None:
    before, now = old.get("task_digests"), new.get("task_digests")
    if not isinstance(before, dict) or not isinstance(now, dict):
        changed.append(f"the tasks changed since this journal was written ({old.get('tasks')} "
                       f"task(s) then, {new.get('tasks')} now)")
        return
    edited = [tid for tid in before if tid in now and before[tid] != now[tid]]
    missing = [tid for tid in before if tid not in now]
    added = [tid for tid in now if tid not in before]
    if edited:
        changed.append(f"the tasks changed since this journal was written: {_some(edited)} "
                       "(prompt, setup, files, runtime, grader or metadata)")
    if missing:
        changed.append(f"the tasks changed since this journal was written: {_some(missing)} "
                       "no longer in the taskset")
    if added:
        grown.append(f"{len(added)} task(s) added ({_some(added)})")
    if not (edited or missing or added):  # same tasks, another order
        changed.append("the tasks changed since this journal was written (their order)")


def _some(ids: list[str]) -> str:
    shown = ", ".join(repr(tid) for tid in ids[:3])
    return f"{len(ids)} task(s): {shown}" + (" ..." if len(ids) > 3 else "")


def _config_changes(old: Any, new: Any, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    if not isinstance(old, Mapping) or not isinstance(new, Mapping):
        return {prefix.rstrip(".") or "config": (old, new)}
    changes: dict[str, tuple[Any, Any]] = {}
    for key in list(old) + [k for k in new if k not in old]:
        a, b = old.get(key), new.get(key)
        if a != b:
            if isinstance(a, Mapping) and isinstance(b, Mapping):
                changes.update(_config_changes(a, b, f"{prefix}{key}."))
            else:
                changes[f"{prefix}{key}"] = (a, b)
    return changes


def _check_tasks(tasks: Taskset) -> None:
    """A run needs at least one task, and every task a grader (else each rollout would start
    a sandbox only to fail at grading)."""
    if not len(tasks):
        raise ConfigError(f"taskset {tasks.name!r} has no tasks; expected at least one task")
    for index, task in enumerate(tasks):
        if task.grader is None:
            raise ConfigError(
                f"{tasks.name}[{index}].grader = None (task {task.id!r}): expected a grader "
                "object with type exec, python or match, or an async callable")


def _as_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _check_same_run(path: Path, rows: list[dict[str, Any]], tasks: Taskset,
                    repeats: int) -> None:
    """Refuse to resume a journal that holds rollouts this run would never make."""
    ids = {task.id for task in tasks}
    foreign = sorted({str(row.get("task_id")) for row in rows} - ids)
    if foreign:
        shown = ", ".join(repr(t) for t in foreign[:3]) + (" ..." if len(foreign) > 3 else "")
        raise ConfigError(
            f"journal = {str(path)!r} holds rows of {len(foreign)} task(s) that taskset "
            f"{tasks.name!r} does not have ({shown}): it belongs to another run; resume it with "
            "its own taskset, or choose a new journal path")
    beyond = sorted({_as_int(row.get("repeat")) for row in rows} - set(range(repeats)),
                    key=lambda r: -1 if r is None else r)
    if beyond:
        raise ConfigError(
            f"journal = {str(path)!r} holds repeat(s) {beyond} but repeats = {repeats}; resume "
            "with the repeats it was started with, or choose a new journal path")


def _journal_path(journal: Any, resume: bool, name: str) -> Path | None:
    if resume and (journal is None or journal == "auto"):
        raise ConfigError(
            f"resume = True continues an existing journal, but journal = {journal!r}; "
            "accepted: the path of the journal to continue (CLI: --journal PATH)"
        )
    if journal is None:
        return None
    if journal == "auto":
        return _auto_journal_path(name)
    if not isinstance(journal, str | os.PathLike) or not str(journal) or os.path.isdir(journal):
        what = " is a directory" if isinstance(journal, str | os.PathLike) and str(journal) \
            else ""
        raise ConfigError(
            f"journal = {journal!r}{what}: expected a file path, 'auto' (a new file under "
            "./runs) or None (no journal)"
        )
    return Path(journal)


def _auto_journal_path(name: str) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in name)
    directory = Path(os.environ.get("SANDBOXNB_RUNS_DIR", "runs"))
    return directory / f"{safe}-{stamp}-{uuid.uuid4().hex[:6]}.jsonl"
