"""Tasks and tasksets: what a rollout is asked to do, and how its answer is graded in the sandbox.

A task carries an id, a prompt, optional per-task runtime overrides (merged field by field into
the run's config), setup steps run in the sandbox before the agent, and a grader. Tasksets load
from Python lists, JSON (a list of task objects) or JSONL (one task object per line).

JSON graders (``"grader": {...}``) run inside the sandbox:

- ``{"type": "exec", "command": "pytest -q", "timeout_s": 30}``: a shell command; the answer is in
  the file named by ``$SANDBOXNB_ANSWER_FILE``.
- ``{"type": "python", "code": "...", "timeout_s": 30}``: a Python program, same answer file.

For both, if the last line of stdout is a JSON object with a ``"reward"`` key, that is the grade
(its other keys become ``info``); otherwise exit status 0 scores 1.0 and anything else 0.0.
``{"type": "match", "expected": "42"}`` compares the stripped answer with ``expected``.
A Python callable ``async (sandbox, task, answer) -> Grade`` is accepted as a grader too.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from sandboxnb.config import ConfigError, RuntimeConfig, merge_config
from sandboxnb.errors import SandboxnbError

if TYPE_CHECKING:
    from sandboxnb.client import Sandbox

__all__ = ["Grade", "Task", "TaskError", "Taskset"]

ANSWER_FILE = ".sandboxnb_answer"


class TaskError(SandboxnbError, ValueError):
    """A task or taskset definition is invalid."""


@dataclass
class Grade:
    """The outcome of grading one answer: a reward and free-form info."""

    reward: float
    info: dict[str, Any] = field(default_factory=dict)


class ExecGrader(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["exec"]
    command: str = Field(min_length=1)
    timeout_s: float = Field(60.0, gt=0)


class PythonGrader(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["python"]
    code: str = Field(min_length=1)
    timeout_s: float = Field(60.0, gt=0)


class MatchGrader(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["match"]
    expected: str


GraderFn = Callable[["Sandbox", "Task", Any], Awaitable[Grade]]
GraderSpec = ExecGrader | PythonGrader | MatchGrader
_GRADER_ADAPTER: TypeAdapter[GraderSpec] = TypeAdapter(
    Annotated[GraderSpec, Field(discriminator="type")]
)


class Task(BaseModel):
    """One unit of work; ``runtime`` holds per-task config overrides (see sandboxnb.config)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    id: str = Field(min_length=1)
    prompt: str = ""
    runtime: dict[str, Any] | None = None
    setup: list[str] = Field(
        default_factory=list, description="shell commands run before the agent"
    )
    files: dict[str, str] = Field(default_factory=dict, description="files written before setup")
    grader: Any = Field(
        None, description="a grader spec (see module docstring) or an async callable"
    )
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("grader", mode="before")
    @classmethod
    def _grader_valid(cls, value: Any) -> Any:
        if value is None or isinstance(value, GraderSpec) or callable(value):
            return value
        if isinstance(value, Mapping):
            return _GRADER_ADAPTER.validate_python(value)
        raise ValueError(
            "expected a grader object with type exec, python or match, or an async callable"
        )

    @field_validator("runtime")
    @classmethod
    def _runtime_overrides_valid(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            merge_config(RuntimeConfig(), value)  # raises ConfigError naming the bad field
        return value

    def effective_config(self, base: RuntimeConfig) -> RuntimeConfig:
        """The run's config with this task's overrides merged in."""
        return merge_config(base, self.runtime)

    async def prepare(self, sandbox: Sandbox) -> None:
        """Write the task's files and run its setup commands in ``sandbox``."""
        for path, content in self.files.items():
            await sandbox.write_file(path, content)
        for command in self.setup:
            result = await sandbox.exec(command)
            if result.exit_code != 0:
                raise RuntimeError(
                    f"setup command {command!r} exited {result.exit_code}: "
                    f"{result.stderr.strip()[-500:]}"
                )

    async def grade(self, sandbox: Sandbox, answer: Any) -> Grade:
        """Grade ``answer`` with this task's grader (in the sandbox for exec/python graders)."""
        grader = self.grader
        if grader is None:
            raise TaskError(f"task {self.id!r} has no grader")
        if isinstance(grader, MatchGrader):
            got = "" if answer is None else str(answer).strip()
            return Grade(1.0 if got == grader.expected.strip() else 0.0, {"answer": got})
        if isinstance(grader, ExecGrader | PythonGrader):
            await sandbox.write_file(ANSWER_FILE, "" if answer is None else str(answer))
            env = {"SANDBOXNB_ANSWER_FILE": ANSWER_FILE}
            if isinstance(grader, ExecGrader):
                result = await sandbox.exec(grader.command, env=env, timeout=grader.timeout_s)
            else:
                result = await sandbox.exec(
                    [sandbox_python(sandbox), "-"],
                    stdin=grader.code,
                    env=env,
                    timeout=grader.timeout_s,
                )
            return grade_from_process(result.exit_code, result.stdout, result.timed_out)
        return await grader(sandbox, self, answer)


def sandbox_python(sandbox: Sandbox) -> str:
    """The Python interpreter to use inside ``sandbox`` (the server's own where it is known)."""
    info = getattr(sandbox, "info", None) or {}
    return info.get("executable") or "python3"


def grade_from_process(exit_code: int | None, stdout: str, timed_out: bool) -> Grade:
    """Apply the exec/python grader rule (JSON ``reward`` line, else exit status)."""
    lines = stdout.strip().splitlines()
    if lines and not timed_out:
        try:
            parsed = json.loads(lines[-1])
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and "reward" in parsed:
            value = parsed.pop("reward")
            try:
                reward = float(value)
            except (TypeError, ValueError):
                raise TaskError(f"grader printed reward = {value!r}: expected a finite "
                                "number") from None
            if not math.isfinite(reward):
                raise TaskError(f"grader printed reward = {value!r}: expected a finite number")
            return Grade(reward, parsed)
    info: dict[str, Any] = {"exit_code": exit_code}
    if timed_out:
        info["timed_out"] = True
    return Grade(1.0 if exit_code == 0 and not timed_out else 0.0, info)


class Taskset(Sequence[Task]):
    """An ordered collection of tasks with unique ids."""

    def __init__(self, tasks: Iterable[Task | Mapping[str, Any]], name: str = "tasks") -> None:
        self.name = name
        self.tasks: list[Task] = []
        seen: set[str] = set()
        for index, item in enumerate(tasks):
            task = item if isinstance(item, Task) else _task_from_mapping(item, f"{name}[{index}]")
            if task.id in seen:
                raise TaskError(f"{name}[{index}].id = {task.id!r}: duplicate task id")
            seen.add(task.id)
            self.tasks.append(task)

    @classmethod
    def from_list(cls, tasks: Iterable[Task | Mapping[str, Any]], name: str = "tasks") -> Taskset:
        return cls(tasks, name)

    @classmethod
    def from_json(cls, path: str | Path) -> Taskset:
        """Load a JSON file holding a list of task objects (or ``{"tasks": [...]}``)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except OSError as err:
            raise TaskError(f"taskset file {str(path)!r} cannot be read: {err.strerror}") from None
        except ValueError as err:
            raise TaskError(f"taskset file {str(path)!r} is not valid JSON: {err}") from None
        if isinstance(data, dict) and "tasks" in data:
            data = data["tasks"]
        if not isinstance(data, list):
            raise TaskError(
                f"taskset file {str(path)!r}: expected a list of task objects, "
                f"got {type(data).__name__}"
            )
        return cls(data, path.stem)

    @classmethod
    def from_jsonl(cls, path: str | Path) -> Taskset:
        """Load a JSONL file with one task object per line."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise TaskError(f"taskset file {str(path)!r} cannot be read: {err.strerror}") from None
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError as err:
                raise TaskError(f"{path}:{number}: {line[:80]!r} is not valid JSON ({err}); "
                                "expected a JSON object per line (a task)") from None
        return cls(rows, path.stem)

    @classmethod
    def load(cls, source: str | Path | Taskset | Iterable[Task | Mapping[str, Any]]) -> Taskset:
        """Resolve a registered taskset name (see :mod:`sandboxnb.tasksets`), a ``.json`` /
        ``.jsonl`` path, a Taskset or a list of tasks."""
        if isinstance(source, Taskset):
            return source
        if isinstance(source, str | Path):
            text = str(source)
            if text.endswith(".jsonl"):
                return cls.from_jsonl(text)
            if text.endswith(".json"):
                return cls.from_json(text)
            from sandboxnb.tasksets import load_taskset  # the registry imports this module

            return load_taskset(text)
        if isinstance(source, Mapping | bytes) or not isinstance(source, Iterable):
            raise TaskError(
                f"taskset = {source!r:.80}: expected a registered taskset name, a .json/.jsonl "
                "path, a Taskset or a list of tasks")
        return cls(source)

    def select(self, patterns: str | Iterable[str]) -> Taskset:
        """The tasks whose id matches any glob pattern (``"HumanEval/1?"``; a string may hold
        several, comma-separated). Raises if nothing matches."""
        if isinstance(patterns, str):
            patterns = [p.strip() for p in patterns.split(",") if p.strip()]
        patterns = list(patterns)
        chosen = [t for t in self.tasks if any(fnmatch.fnmatchcase(t.id, p) for p in patterns)]
        if not chosen:
            some = ", ".join(repr(t.id) for t in self.tasks[:3])
            raise TaskError(f"tasks = {','.join(patterns)!r} matches no task id in {self.name}; "
                            f"expected globs of its task ids ({some}"
                            f"{' ...' if len(self.tasks) > 3 else ''})")
        return Taskset(chosen, self.name)

    def __getitem__(self, index):  # type: ignore[override]
        return self.tasks[index]

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks)

    def __repr__(self) -> str:
        return f"<Taskset {self.name!r}: {len(self)} tasks>"


def _task_from_mapping(data: Mapping[str, Any], where: str) -> Task:
    if not isinstance(data, Mapping):
        raise TaskError(f"{where}: expected a task object, got {type(data).__name__}")
    data = dict(data)
    if "setup" in data and isinstance(data["setup"], str):
        data["setup"] = [data["setup"]]
    try:
        return Task.model_validate(data)
    except ConfigError as err:
        raise TaskError(f"{where}.runtime: {err}") from None
    except ValidationError as err:
        problems = "; ".join(_problem(where, e) for e in err.errors())
        raise TaskError(
            f"{where} (id {data.get('id')!r}) is not a valid task: {problems}"
        ) from None


def _problem(where: str, error: Any) -> str:
    """``where.field = value: what is wrong`` (a missing field's value is None)."""
    loc = ".".join(str(p) for p in error["loc"])
    value = None if error["type"] == "missing" else error.get("input")
    message = error["msg"].removeprefix("Value error, ")
    return f"{where}.{loc} = {value!r}: {message}"
