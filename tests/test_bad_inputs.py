"""Malformed input never starts a sandbox: every front end (the CLI, the Python API, the magics,
taskset files) refuses it first, with a message naming the field, the value and what is accepted.

How "no sandbox started" is proven: an audit hook (``sys.addaudithook``) records every spawn of
a sandbox server (``subprocess.Popen``, ``os.posix_spawn`` or ``os.exec`` whose command line
holds the server) and every ``sandboxnb-*`` temporary directory made while a row runs: in the
CLI's own process (started through a small probe that installs the hook, then runs
``python -m sandboxnb``) and in this process for the API and magic rows. A local sandbox is a
spawned server process, so a row that started one cannot hide it, however fast it ended. The
control rows (valid input) prove the detector sees a sandbox start.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import sandboxnb
from sandboxnb.errors import SandboxnbError

# ---- the detector ----------------------------------------------------------------------------
#: spawn events, and what a sandbox server's command line holds (the server bundle or package)
_SPAWNS = ("subprocess.Popen", "os.posix_spawn", "os.exec")
_MARKERS = ("sandboxnb.server", "sandboxnb/server")

# The CLI rows run in one probe process that installs the hook, imports the CLI once, then forks
# a child per row that runs ``sandboxnb.cli.main(argv)`` as ``python -m sandboxnb`` would (its
# own cwd, TMPDIR, stdout and stderr files, spawn log): each row is its own process, at the cost
# of a fork instead of an interpreter start.
PROBE = rf"""
import json, os, sys
_log = [None]
def _hook(event, args):
    if _log[0] and (event in {_SPAWNS!r} and any(m in repr(args) for m in {_MARKERS!r}) or (
            event == "tempfile.mkdtemp" and "sandboxnb-" in str(args[0]))):
        with open(_log[0], "a") as fh:
            fh.write(event + " " + repr(args)[:300] + "\n")
sys.addaudithook(_hook)
import sandboxnb.cli, sandboxnb.scheduler, sandboxnb.tasks, sandboxnb.providers.local
for job in map(json.loads, sys.stdin):
    pid = os.fork()
    if pid == 0:
        os.chdir(job["cwd"])
        os.environ["TMPDIR"] = job["cwd"]
        import tempfile
        tempfile.tempdir = None
        _log[0] = job["log"]
        for fd, name in ((1, "stdout"), (2, "stderr")):
            out = os.open(os.path.join(job["cwd"], name), os.O_WRONLY | os.O_CREAT, 0o600)
            os.dup2(out, fd)
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", closefd=False)
        try:
            code = sandboxnb.cli.main(job["argv"])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps([job["id"], os.waitstatus_to_exitcode(status)]), flush=True)
"""

_RECORDING: list[list[str]] = []  # the open recordings of this process's hook


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if not _RECORDING:
        return
    if (event in _SPAWNS and any(m in repr(args) for m in _MARKERS)) or (
            event == "tempfile.mkdtemp" and "sandboxnb-" in str(args[0])):
        _RECORDING[-1].append(f"{event} {args!r:.300}")


sys.addaudithook(_hook)  # cannot be removed; inert unless a row is recording


def _recorded(fn) -> tuple[BaseException | None, list[str]]:
    """Call ``fn``; return what it raised and the spawns it made."""
    starts: list[str] = []
    _RECORDING.append(starts)
    try:
        fn()
    except BaseException as err:
        return err, starts
    finally:
        _RECORDING.remove(starts)
    return None, starts


# ---- shared inputs ---------------------------------------------------------------------------
TASK = {"id": "t0", "prompt": "say hi", "grader": {"type": "match", "expected": "hi"}}


async def ok_agent(sandbox, task):
    return "hi"


def not_async_agent(sandbox, task):
    return "hi"


@dataclass(frozen=True)
class Row:
    """One malformed input: where it goes, what it is, and the three things its error names."""

    id: str
    kind: str  # cli | api | magic | cell
    given: Any  # CLI args / a callable / a magic line / (line, cell)
    field: str
    value: str
    accepted: str


def _cli_row(id: str, args: list[str], field: str, value: str, accepted: str) -> Row:
    return Row(id, "cli", args, field, value, accepted)


# The base CLI invocation every CLI row adds to (FILES: paths made by the fixture).
CLI = [
    _cli_row("cpu-huge", ["--cpu", "1e9"], "resources.cpu", "'1e9'", "<= 1024"),
    _cli_row("cpu-inf", ["--cpu", "inf"], "resources.cpu", "'inf'", "a number >= 0.01"),
    _cli_row("cpu-nan", ["--cpu", "nan"], "resources.cpu", "'nan'", "a number >= 0.01"),
    _cli_row("cpu-negative", ["--cpu", "-1"], "resources.cpu", "'-1'", ">= 0.01"),
    _cli_row("cpu-zero", ["--cpu", "0"], "resources.cpu", "'0'", ">= 0.01"),
    _cli_row("cpu-word", ["--cpu", "two"], "resources.cpu", "'two'", "a number"),
    _cli_row("cpu-empty", ["--cpu", ""], "resources.cpu", "''", "a number"),
    _cli_row("cpu-unicode", ["--cpu", "٣"], "resources.cpu", "'٣'", "ASCII"),
    _cli_row("memory-tiny", ["--memory-mb", "1"], "resources.memory_mb", "'1'", ">= 4"),
    _cli_row("memory-zero", ["--memory-mb", "0"], "resources.memory_mb", "'0'", ">= 4"),
    _cli_row("memory-negative", ["--memory-mb", "-512"], "resources.memory_mb", "'-512'",
             "an integer"),
    _cli_row("memory-float", ["--memory-mb", "1.5"], "resources.memory_mb", "'1.5'",
             "an integer"),
    _cli_row("memory-huge", ["--memory-mb", "99999999999"], "resources.memory_mb",
             "'99999999999'", "<= 16777216"),
    _cli_row("memory-inf", ["--memory-mb", "inf"], "resources.memory_mb", "'inf'", "an integer"),
    _cli_row("memory-bool", ["--memory-mb", "True"], "resources.memory_mb", "'True'",
             "an integer"),
    _cli_row("memory-unicode", ["--memory-mb", "٥١٢"], "resources.memory_mb", "'٥١٢'", "ASCII"),
    _cli_row("disk-zero", ["--disk-mb", "0"], "resources.disk_mb", "'0'", ">= 1"),
    _cli_row("disk-word", ["--disk-mb", "big"], "resources.disk_mb", "'big'", "an integer"),
    _cli_row("gpu-empty", ["--gpu", ""], "GPU spec", "''", "'TYPE' or 'TYPE:COUNT'"),
    _cli_row("gpu-count-zero", ["--gpu", "H100:0"], "resources.gpu", "H100:0",
             "greater than or equal to 1"),
    _cli_row("gpu-count-word", ["--gpu", "H100:x"], "GPU spec", "'H100:x'", "'TYPE:COUNT'"),
    _cli_row("image-empty", ["--image", ""], "image", "''", "at least 1 character"),
    _cli_row("image-blank", ["--image", "   "], "image", "''", "at least 1 character"),
    _cli_row("startup-zero", ["--startup-timeout", "0"], "limits.startup_timeout_s", "'0'",
             "> 0"),
    _cli_row("startup-negative", ["--startup-timeout", "-1"], "limits.startup_timeout_s", "'-1'",
             "> 0"),
    _cli_row("startup-inf", ["--startup-timeout", "inf"], "limits.startup_timeout_s", "'inf'",
             "a number"),
    _cli_row("startup-nan", ["--startup-timeout", "nan"], "limits.startup_timeout_s", "'nan'",
             "a number"),
    _cli_row("startup-huge", ["--startup-timeout", "1e12"], "limits.startup_timeout_s",
             "'1e12'", "<= 2592000"),
    _cli_row("startup-unicode", ["--startup-timeout", "٣٠"], "limits.startup_timeout_s",
             "'٣٠'", "ASCII"),
    _cli_row("run-timeout-zero", ["--run-timeout", "0"], "limits.run_timeout_s", "'0'", "> 0"),
    _cli_row("run-timeout-inf", ["--run-timeout", "inf"], "limits.run_timeout_s", "'inf'",
             "a number"),
    _cli_row("idle-negative", ["--idle-timeout", "-3"], "limits.idle_timeout_s", "'-3'", "> 0"),
    _cli_row("idle-huge", ["--idle-timeout", "1e99"], "limits.idle_timeout_s", "'1e99'",
             "<= 2592000"),
    _cli_row("rollout-zero", ["--rollout-timeout", "0"], "rollout_timeout_s", "'0'",
             "seconds > 0"),
    _cli_row("rollout-inf", ["--rollout-timeout", "inf"], "rollout_timeout_s", "'inf'",
             "seconds > 0"),
    _cli_row("rollout-nan", ["--rollout-timeout", "nan"], "rollout_timeout_s", "'nan'",
             "seconds > 0"),
    _cli_row("rollout-word", ["--rollout-timeout", "soon"], "rollout_timeout_s", "'soon'",
             "seconds > 0"),
    _cli_row("rollout-unicode", ["--rollout-timeout", "\u0661\u0660"], "rollout_timeout_s",
             "'\u0661\u0660'", "ASCII"),
    _cli_row("concurrent-zero", ["--max-concurrent", "0"], "--max-concurrent", "'0'",
             "an integer >= 1"),
    _cli_row("concurrent-negative", ["--max-concurrent", "-1"], "--max-concurrent", "'-1'",
             "an integer >= 1"),
    _cli_row("concurrent-float", ["--max-concurrent", "1.5"], "--max-concurrent", "'1.5'",
             "an integer >= 1"),
    _cli_row("concurrent-unicode", ["--max-concurrent", "٣"], "--max-concurrent", "'٣'",
             "ASCII"),
    _cli_row("concurrent-empty", ["--max-concurrent", ""], "--max-concurrent", "''",
             "an integer >= 1"),
    _cli_row("concurrent-huge", ["--max-concurrent", "10000000000"], "--max-concurrent",
             "'10000000000'", "<= 10000"),
    _cli_row("repeats-zero", ["--repeats", "0"], "--repeats", "'0'", "an integer >= 1"),
    _cli_row("repeats-word", ["--repeats", "many"], "--repeats", "'many'", "an integer >= 1"),
    _cli_row("repeats-unicode", ["--repeats", "٢"], "--repeats", "'٢'", "ASCII"),
    _cli_row("repeats-huge", ["--repeats", "1e9"], "--repeats", "'1e9'", "an integer >= 1"),
    _cli_row("repeats-too-many", ["--repeats", "100000000"], "--repeats", "'100000000'",
             "<= 10000"),
    _cli_row("limit-zero", ["--limit", "0"], "--limit", "'0'", "an integer >= 1"),
    _cli_row("limit-negative", ["--limit", "-2"], "--limit", "'-2'", "an integer >= 1"),
    _cli_row("limit-unicode", ["--limit", "٣"], "--limit", "'٣'", "ASCII"),
    _cli_row("tasks-empty", ["--tasks", ""], "--tasks", "''", "comma-separated"),
    _cli_row("tasks-commas", ["--tasks", ",,"], "--tasks", "',,'", "comma-separated"),
    _cli_row("tasks-no-match", ["--tasks", "Nope/*"], "tasks", "'Nope/*'", "HumanEval/0"),
    _cli_row("tasks-limit-no-match", ["--tasks", "Nope/*", "--limit", "3"], "tasks", "'Nope/*'",
             "HumanEval/0"),
    _cli_row("unknown-flag", ["--cpus", "2"], "--cpus", "unrecognized", "did you mean --cpu"),
    _cli_row("unknown-flag-far", ["--frobnicate"], "--frobnicate", "unrecognized",
             "--help"),
    _cli_row("removed-timeout", ["--timeout", "5"], "--timeout", "no longer accepted",
             "--run-timeout SECONDS"),
    _cli_row("runtime-typo", ["--runtime", "locall"], "runtime", "'locall'",
             "did you mean 'local'"),
    _cli_row("runtime-empty", ["--runtime", ""], "runtime", "''", "accepted: local"),
    _cli_row("runtime-unavailable", ["--runtime", "daytona"], "--runtime", "'daytona'",
             "DAYTONA_API_KEY"),
    _cli_row("agent-typo", ["--agent", "oracel"], "agent", "'oracel'", "did you mean 'oracle'"),
    _cli_row("agent-empty", ["--agent", ""], "agent", "''", "'samples:PATH'"),
    _cli_row("agent-no-module", ["--agent", "no_such_mod:fn"], "agent", "'no_such_mod:fn'",
             "cannot import"),
    _cli_row("agent-not-async", ["--agent", "os:getcwd"], "agent", "os:getcwd",
             "async def agent(sandbox, task)"),
    _cli_row("agent-no-samples", ["--agent", "samples:/no/such.jsonl"], "samples file",
             "'/no/such.jsonl'", "cannot be read"),
    _cli_row("journal-empty", ["--journal", ""], "journal", "''", "a file path"),
    _cli_row("journal-dir", ["--journal", "{dir}"], "journal", "{dir}", "a file path"),
    _cli_row("journal-unwritable", ["--journal", "/proc/sandboxnb-j.jsonl"], "journal",
             "'/proc/sandboxnb-j.jsonl'", "writable"),
    _cli_row("resume-auto", ["--journal", "auto", "--resume"], "resume", "journal = 'auto'",
             "the path of the journal to continue"),
    _cli_row("resume-garbage", ["--journal", "{garbage}", "--resume"], "garbage.jsonl:1",
             "[1, 2]", "task_id, repeat and status"),
    _cli_row("output-no-folder", ["--output", "/nonexistent/dir/x.csv"], "--output",
             "'/nonexistent/dir/x.csv'", "writable"),
    _cli_row("output-extension", ["--output", "out.xlsx"], "--output", "'out.xlsx'",
             ".jsonl, .csv or .parquet"),
    _cli_row("output-no-extension", ["--output", "out"], "--output", "'out'",
             ".jsonl, .csv or .parquet"),
    _cli_row("output-dir", ["--output", "{dirjsonl}"], "--output", "dir.jsonl",
             "a new file"),
    _cli_row("output-occupied", ["--output", "{occupied}"], "--output", "occupied.csv",
             "a new file"),
    _cli_row("output-unwritable", ["--output", "/proc/sandboxnb-out.csv"], "--output",
             "'/proc/sandboxnb-out.csv'", "writable"),
    _cli_row("taskset-typo", ["@humaneva"], "taskset", "'humaneva'", "did you mean 'humaneval'"),
    _cli_row("taskset-missing-file", ["@missing.jsonl"], "taskset file", "missing.jsonl",
             "cannot be read"),
    _cli_row("taskset-empty-name", ["@"], "taskset", "''", "accepted: humaneval"),
    # task files (JSONL / JSON), through the CLI
    _cli_row("file-not-json", ["@{file:not-json}"], "not-json.jsonl:1", "'{oops'",
             "a JSON object"),
    _cli_row("file-empty", ["@{file:empty}"], "taskset", "'empty'", "at least one task"),
    _cli_row("file-missing-id", ["@{file:missing-id}"], "missing-id[0].id", "None",
             "Field required"),
    _cli_row("file-no-grader", ["@{file:no-grader}"], "no-grader[0].grader", "None",
             "a grader object"),
    _cli_row("file-bad-grader", ["@{file:bad-grader}"], "bad-grader[0]", "'shell'",
             "'exec', 'python', 'match'"),
    _cli_row("file-prompt-type", ["@{file:prompt-type}"], "prompt-type[0]", "prompt = 5",
             "valid string"),
    _cli_row("file-id-type", ["@{file:id-type}"], "id-type[0]", "id = 7", "valid string"),
    _cli_row("file-duplicate-ids", ["@{file:duplicate}"], "duplicate[1].id", "'t0'",
             "duplicate task id"),
    _cli_row("file-line-a-list", ["@{file:a-list}"], "a-list[0]", "list", "a task object"),
    _cli_row("file-bad-runtime", ["@{file:bad-runtime}"], "bad-runtime[0].runtime",
             "resources.cpu = 'x'", "a valid number"),
    _cli_row("file-json-dict", ["@{json:a-dict}"], "taskset file", "a-dict.json",
             "a list of task objects"),
]

#: files a CLI row may name: stem -> text
TASK_FILES = {
    "not-json": "{oops\n",
    "empty": "",
    "missing-id": json.dumps({"prompt": "x", "grader": TASK["grader"]}) + "\n",
    "no-grader": json.dumps({"id": "t0", "prompt": "x"}) + "\n",
    "bad-grader": json.dumps({**TASK, "grader": {"type": "shell"}}) + "\n",
    "prompt-type": json.dumps({**TASK, "prompt": 5}) + "\n",
    "id-type": json.dumps({**TASK, "id": 7}) + "\n",
    "duplicate": (json.dumps(TASK) + "\n") * 2,
    "a-list": "[1, 2]\n",
    "bad-runtime": json.dumps({**TASK, "runtime": {"resources": {"cpu": "x"}}}) + "\n",
}


@pytest.fixture(scope="module")
def cli_outcomes(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess[str], list[str],
                                                      Path]]:
    """Every CLI row (and the control), run in parallel: its process, its spawns, its dir."""
    base = tmp_path_factory.mktemp("cli")
    files = {}
    for stem, text in TASK_FILES.items():
        (base / f"{stem}.jsonl").write_text(text)
        files[f"{{file:{stem}}}"] = str(base / f"{stem}.jsonl")
    (base / "a-dict.json").write_text('{"id": "t0"}')
    files["{json:a-dict}"] = str(base / "a-dict.json")
    (base / "dir.jsonl").mkdir()
    (base / "adir").mkdir()
    files["{dirjsonl}"] = str(base / "dir.jsonl")
    files["{dir}"] = str(base / "adir")
    (base / "occupied.csv").write_text("old results\n")
    files["{occupied}"] = str(base / "occupied.csv")
    (base / "garbage.jsonl").write_text("[1, 2]\n")
    files["{garbage}"] = str(base / "garbage.jsonl")
    rows = [*CLI, _cli_row("control", [], "", "", "")]

    def job(row: Row) -> dict[str, Any]:
        where = base / row.id
        where.mkdir()
        args = [files.get(arg, arg) for arg in row.given]
        taskset = "humaneval"
        if args and args[0].startswith("@"):
            taskset, args = args[0][1:], args[1:]
        for key, path in files.items():
            args = [arg.replace(key, path) for arg in args]
            taskset = taskset.replace(key, path)
        if taskset == "humaneval" and "--tasks" not in args:  # a row accepted by mistake
            args += ["--tasks", "HumanEval/0"]  # runs one rollout, not 164
        if "--journal" not in args:
            args += ["--journal", str(where / "j.jsonl")]
        if "--agent" not in args:
            args += ["--agent", "oracle"]
        if "--runtime" not in args:
            args += ["--runtime", "local"]
        return {"id": row.id, "cwd": str(where), "log": str(where / "spawns.log"),
                "argv": ["run", taskset, "--no-progress", *args]}

    jobs = [job(row) for row in rows]
    lanes = [jobs[i::4] for i in range(4)]  # 4 probe processes, each forking its rows in turn

    def lane(part: list[dict[str, Any]]) -> list[tuple[str, int]]:
        proc = subprocess.run(
            [sys.executable, "-c", PROBE], input="".join(json.dumps(j) + "\n" for j in part),
            capture_output=True, text=True, timeout=300, check=False,
            env={**os.environ, "DAYTONA_API_KEY": ""})
        assert proc.returncode == 0, proc.stderr
        return [tuple(json.loads(line)) for line in proc.stdout.splitlines()]

    with ThreadPoolExecutor(max_workers=len(lanes)) as pool:
        codes = dict(code for part in pool.map(lane, lanes) for code in part)
    outcomes = {}
    for j in jobs:
        where = Path(j["cwd"])
        log = where / "spawns.log"
        proc = subprocess.CompletedProcess(j["argv"], codes.get(j["id"], -1),
                                           (where / "stdout").read_text(),
                                           (where / "stderr").read_text())
        outcomes[j["id"]] = (proc, log.read_text().splitlines() if log.exists() else [], where)
    return outcomes


def _assert_names(message: str, row: Row) -> None:
    for part in (row.field, row.value, row.accepted):
        assert part in message, f"{row.id}: {part!r} not in {message!r}"


@pytest.mark.parametrize("row", CLI, ids=[row.id for row in CLI])
def test_cli_refuses_before_any_sandbox(cli_outcomes, row):
    proc, spawns, where = cli_outcomes[row.id]
    assert proc.returncode == 2, f"{row.id}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    assert spawns == [], f"{row.id}: started {spawns}"
    assert not (where / "j.jsonl").exists(), "nothing may run, so nothing is journaled"
    assert not list(where.glob("sandboxnb-*"))
    message = proc.stderr.replace("{dir}", "")
    _assert_names(message, _resolve(row, where.parent))


def _resolve(row: Row, base: Path) -> Row:
    value = row.value.replace("{dir}", str(base / "adir"))
    return Row(row.id, row.kind, row.given, row.field, value, row.accepted)


def test_cli_control_row_starts_a_sandbox(cli_outcomes):
    """The detector works: valid input starts (and releases) a sandbox, and it is seen."""
    proc, spawns, _ = cli_outcomes["control"]
    assert proc.returncode == 0, proc.stderr
    assert any("subprocess.Popen" in s for s in spawns), spawns


# ---- the Python API ---------------------------------------------------------------------------
def _run(*args: Any, **kwargs: Any):
    kwargs.setdefault("journal", None)
    kwargs.setdefault("progress", False)
    return lambda: asyncio.run(sandboxnb.run(*args, **kwargs))


def _run_ok(**kwargs: Any):
    return _run([TASK], ok_agent, "local", **kwargs)


def _launch(*args: Any, **kwargs: Any):
    async def go() -> None:
        async with sandboxnb.launch(*args, **kwargs):
            pass

    return lambda: asyncio.run(go())


def _api(id: str, call, field: str, value: str, accepted: str) -> Row:
    return Row(id, "api", call, field, value, accepted)


API = [
    _api("max-concurrent-zero", _run_ok(max_concurrent=0), "max_concurrent", "0",
         "an integer >= 1"),
    _api("max-concurrent-float", _run_ok(max_concurrent=1.5), "max_concurrent", "1.5",
         "an integer >= 1"),
    _api("max-concurrent-bool", _run_ok(max_concurrent=True), "max_concurrent", "True",
         "an integer >= 1"),
    _api("max-concurrent-text", _run_ok(max_concurrent="4"), "max_concurrent", "'4'",
         "an integer >= 1"),
    _api("max-concurrent-huge", _run_ok(max_concurrent=10**12), "max_concurrent",
         "1000000000000", "<= 10000"),
    _api("repeats-negative", _run_ok(repeats=-1), "repeats", "-1", "an integer >= 1"),
    _api("repeats-huge", _run_ok(repeats=10**9), "repeats", "1000000000", "<= 10000"),
    _api("repeats-none", _run_ok(repeats=None), "repeats", "None", "an integer >= 1"),
    _api("timeout-zero", _run_ok(timeout_s=0), "timeout_s", "0", "seconds > 0"),
    _api("timeout-inf", _run_ok(timeout_s=float("inf")), "timeout_s", "inf", "seconds > 0"),
    _api("timeout-nan", _run_ok(timeout_s=float("nan")), "timeout_s", "nan", "seconds > 0"),
    _api("timeout-text", _run_ok(timeout_s="5"), "timeout_s", "'5'", "seconds > 0"),
    _api("timeout-bool", _run_ok(timeout_s=True), "timeout_s", "True", "seconds > 0"),
    _api("journal-int", _run_ok(journal=123), "journal", "123", "a file path"),
    _api("journal-empty", _run_ok(journal=""), "journal", "''", "a file path"),
    _api("resume-text", _run_ok(journal="x.jsonl", resume="yes"), "resume", "'yes'",
         "True, False or 'force'"),
    _api("config-cpu-huge", _run_ok(config={"resources": {"cpu": 1e9}}), "resources.cpu",
         "1000000000.0", "less than or equal to 1024"),
    _api("config-memory-bool", _run_ok(config={"resources": {"memory_mb": True}}),
         "resources.memory_mb", "True", "not the bool"),
    _api("config-unknown-field", _run_ok(config={"cpu": 2}), "cpu", "2",
         "accepted: image, resources, limits"),
    _api("config-not-mapping", _run_ok(config="cpu=2"), "runtime overrides", "'cpu=2'",
         "a mapping"),
    _api("config-idle-nan", _run_ok(config={"limits": {"idle_timeout_s": float("nan")}}),
         "limits.idle_timeout_s", "nan", "finite number"),
    _api("agent-int", _run([TASK], 123, "local"), "agent", "123", "an async function"),
    _api("agent-typo", _run([TASK], "oracel", "local"), "agent", "'oracel'",
         "did you mean 'oracle'"),
    _api("agent-sync", _run([TASK], not_async_agent, "local"), "agent", "not_async_agent",
         "async def agent(sandbox, task)"),
    _api("runtime-typo", _run([TASK], ok_agent, "locall"), "runtime", "'locall'",
         "did you mean 'local'"),
    _api("runtime-int", _run([TASK], ok_agent, 123), "runtime", "123", "a provider name (local"),
    _api("taskset-int", _run(123, ok_agent, "local"), "taskset", "123",
         "a registered taskset name"),
    _api("taskset-typo", _run("humaneva", ok_agent, "local"), "taskset", "'humaneva'",
         "did you mean 'humaneval'"),
    _api("taskset-empty-list", _run([], ok_agent, "local"), "taskset", "'tasks'",
         "at least one task"),
    _api("task-no-grader", _run([{"id": "t0"}], ok_agent, "local"), "tasks[0].grader", "None",
         "a grader object"),
    _api("task-id-int", _run([{**TASK, "id": 1}], ok_agent, "local"), "tasks[0]", "id = 1",
         "valid string"),
    _api("task-not-mapping", _run(["t0"], ok_agent, "local"), "tasks[0]", "str",
         "a task object"),
    _api("task-duplicate", _run([TASK, TASK], ok_agent, "local"), "tasks[1].id", "'t0'",
         "duplicate task id"),
    _api("task-setup-int", _run([{**TASK, "setup": [1]}], ok_agent, "local"), "setup.0",
         "1", "valid string"),
    _api("task-unknown-field", _run([{**TASK, "tests": "x"}], ok_agent, "local"), "tests",
         "'x'", "Extra inputs are not permitted"),
    _api("launch-cpu-text", _launch("local", cpu="abc"), "resources.cpu", "'abc'",
         "a valid number"),
    _api("launch-cpu-huge", _launch("local", cpu=1e9), "resources.cpu", "1000000000.0",
         "less than or equal to 1024"),
    _api("launch-memory-bool", _launch("local", memory_mb=True), "resources.memory_mb", "True",
         "not the bool"),
    _api("launch-unknown-option", _launch("local", bogus=1), "bogus", "'local'",
         "runtime options are image, cpu"),
    _api("launch-runtime-int", _launch(123), "runtime", "123", "a provider name (local"),
    _api("launch-runtime-typo", _launch("locall"), "runtime", "'locall'",
         "did you mean 'local'"),
    _api("launch-idle-nan", _launch("local", idle_timeout_s=float("nan")),
         "limits.idle_timeout_s", "nan", "finite number"),
    _api("launch-gpu-unsupported", _launch("local", gpu="H100"), "resources.gpu", "H100",
         "local honours"),
    _api("launch-image-empty", _launch("local", image=""), "image", "''",
         "at least 1 character"),
    _api("config-class-cpu", lambda: sandboxnb.RuntimeConfig(resources={"cpu": -1}),
         "resources.cpu", "-1", "greater than or equal to 0.01"),
    _api("config-class-unknown", lambda: sandboxnb.RuntimeConfig(cpus=2), "cpus", "2",
         "accepted: image, resources, limits"),
    _api("config-class-limits", lambda: sandboxnb.Limits(run_timeout_s="x"),
         "run_timeout_s", "'x'", "a valid number"),
    _api("config-class-gpu", lambda: sandboxnb.GPU(type="H100", count=0), "count", "0",
         "greater than or equal to 1"),
]


@pytest.mark.parametrize("row", API, ids=[row.id for row in API])
def test_api_refuses_before_any_sandbox(row, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    error, spawns = _recorded(row.given)
    assert spawns == [], f"{row.id}: started {spawns}"
    assert isinstance(error, SandboxnbError), f"{row.id}: {type(error).__name__}: {error}"
    _assert_names(str(error), row)


def test_api_control_row_starts_a_sandbox():
    error, spawns = _recorded(_run_ok())
    assert error is None
    assert any("subprocess.Popen" in s for s in spawns), spawns


# ---- the magics ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ip():
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "sandboxnb")
    shell.user_ns["one_task"] = sandboxnb.Taskset([TASK], name="one")
    shell.user_ns["ok_agent"] = ok_agent
    try:
        yield shell
    finally:
        shell.run_line_magic("unload_ext", "sandboxnb")


def _magic(id: str, line: str, field: str, value: str, accepted: str) -> Row:
    return Row(id, "magic", line, field, value, accepted)


RUN = "run one_task --agent ok_agent "
MAGICS = [
    _magic("launch-cpu-inf", "launch local --cpu inf", "resources.cpu", "'inf'", "a number"),
    _magic("launch-cpu-unicode", "launch local --cpu ٣", "resources.cpu", "'٣'", "ASCII"),
    _magic("launch-memory-tiny", "launch local --memory-mb 1", "resources.memory_mb", "'1'",
           ">= 4"),
    _magic("launch-name-builtin", "launch local --name print", "--name", "'print'",
           "shadows the Python builtin"),
    _magic("launch-name-keyword", "launch local --name class", "--name", "'class'",
           "a Python keyword"),
    _magic("launch-name-module", "launch local --name sandboxnb", "--name", "'sandboxnb'",
           "would replace the sandboxnb module"),
    _magic("launch-name-history", "launch local --name In", "--name", "'In'",
           "would replace IPython's input history"),
    _magic("launch-name-digit", "launch local --name 1box", "--name", "'1box'",
           "valid Python identifier"),
    _magic("launch-name-quoted", "launch local --name \"'box'\"", "--name", "\\'box\\'",
           "valid Python identifier"),
    _magic("launch-provider-typo", "launch locall", "runtime", "'locall'",
           "did you mean 'local'"),
    _magic("launch-unknown-flag", "launch local --cpus 2", "--cpus", "unrecognized",
           "did you mean --cpu"),
    _magic("doctor-provider-typo", "doctor locall", "runtime", "'locall'",
           "did you mean 'local'"),
    _magic("subcommand-typo", "lunch local", "SUBCOMMAND", "'lunch'", "did you mean 'launch'"),
    _magic("run-limit-zero", RUN + "--limit 0", "--limit", "'0'", "an integer >= 1"),
    _magic("run-limit-unicode", RUN + "--limit ٣", "--limit", "'٣'", "ASCII"),
    _magic("run-concurrent-zero", RUN + "--max-concurrent 0", "--max-concurrent", "'0'",
           "an integer >= 1"),
    _magic("run-concurrent-unicode", RUN + "--max-concurrent ٣", "--max-concurrent", "'٣'",
           "ASCII"),
    _magic("run-repeats-negative", RUN + "--repeats -1", "--repeats", "'-1'", "an integer >= 1"),
    _magic("run-tasks-no-match", RUN + "--tasks nope*", "tasks", "'nope*'", "t0"),
    _magic("run-rollout-zero", RUN + "--rollout-timeout 0", "rollout_timeout_s", "'0'",
           "seconds > 0"),
    _magic("run-output-builtin", RUN + "-o list", "-o", "'list'", "shadows the Python builtin"),
    _magic("run-output-bad", RUN + "-o 1df", "-o", "'1df'", "a Python variable name"),
    _magic("run-output-last-run", RUN + "-o _sandbox_run", "-o", "'_sandbox_run'",
           "would replace the last run"),
    _magic("run-taskset-typo", "run humaneva --agent oracle", "taskset", "'humaneva'",
           "did you mean 'humaneval'"),
    _magic("run-agent-typo", "run one_task --agent oracel", "agent", "'oracel'",
           "did you mean 'oracle'"),
    _magic("run-runtime-typo", RUN + "--runtime locall", "runtime", "'locall'",
           "did you mean 'local'"),
    _magic("run-no-grader", "run no_grader --agent ok_agent", "grader", "None",
           "a grader"),
    _magic("run-journal-dir", RUN + "--journal .", "journal", "'.'", "a file path"),
    _magic("run-idle-nan", RUN + "--idle-timeout nan", "limits.idle_timeout_s", "'nan'",
           "a number"),
]
CELLS = [
    Row("cell-provider-typo", "cell", ("locall", "1"), "%%sandbox locall", "locall",
        "providers: local"),
    Row("cell-cpu-inf", "cell", ("local --cpu inf", "1"), "resources.cpu", "'inf'", "a number"),
    Row("cell-output-builtin", "cell", ("local -o dict", "1"), "-o", "'dict'",
        "shadows the Python builtin"),
    Row("cell-output-keyword", "cell", ("local -o lambda", "1"), "-o", "'lambda'",
        "a Python keyword"),
]


@pytest.mark.parametrize("row", MAGICS + CELLS, ids=[row.id for row in MAGICS + CELLS])
def test_magics_refuse_before_any_sandbox(ip, row, tmp_path, monkeypatch):
    from IPython.core.error import UsageError

    monkeypatch.chdir(tmp_path)
    ip.user_ns["no_grader"] = [{"id": "t0"}]
    if row.kind == "cell":
        error, spawns = _recorded(lambda: ip.run_cell_magic("sandbox", *row.given))
    else:
        error, spawns = _recorded(lambda: ip.run_line_magic("sandbox", row.given))
    assert spawns == [], f"{row.id}: started {spawns}"
    # IPython shows a UsageError as a one-line error in the cell, without a traceback
    assert isinstance(error, UsageError), f"{row.id}: {type(error).__name__}: {error}"
    _assert_names(str(error), row)
    assert "print" not in ip.user_ns or ip.user_ns["print"] is print


def test_magic_control_row_starts_a_sandbox(ip):
    error, spawns = _recorded(lambda: ip.run_line_magic("sandbox", "launch local --name ok"))
    try:
        assert error is None and any("subprocess.Popen" in s for s in spawns), (error, spawns)
    finally:
        ip.run_line_magic("sandbox", "stop --all")


def test_the_table_is_large():
    assert len(CLI) + len(API) + len(MAGICS) + len(CELLS) >= 100
