"""The journal holds: a torn tail is repaired, never appended to; a line that is not a row is a
clear error naming it; resuming another run's journal is refused. Through the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import sandboxnb
from sandboxnb.errors import ConfigError
from sandboxnb.journal import read_journal


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sandboxnb", "run", "humaneval", "--agent",
                           "oracle", "--runtime", "local", "--no-progress", *args],
                          capture_output=True, text=True, timeout=300, check=False)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_torn_tail_is_cut_and_resume_finishes_the_run(tmp_path):
    journal = tmp_path / "j.jsonl"
    first = _cli("--tasks", "HumanEval/[0-3]", "--journal", str(journal))
    assert first.returncode == 0, first.stderr
    lines = journal.read_text().splitlines(keepends=True)
    # a crash while writing the 4th row: half of it reached the disk, no newline
    assert len(lines) == 5 and "sandboxnb_journal" in lines[0]  # the header, then 4 rows
    journal.write_text("".join(lines[:4]) + lines[4][: len(lines[4]) // 2])
    for _ in range(2):  # resuming twice: the second must find a clean, complete journal
        again = _cli("--tasks", "HumanEval/[0-3]", "--journal", str(journal), "--resume")
        assert again.returncode == 0, again.stderr
        assert "4/4 rollouts" in again.stdout, again.stdout
    header, *rows = _rows(journal)  # every line parses: the fragment was cut, not appended to
    assert header["sandboxnb_journal"] == 1
    assert sorted(row["task_id"] for row in rows) == [f"HumanEval/{i}" for i in range(4)]
    assert len(sandboxnb.load(journal).to_pandas()) == 4


@pytest.mark.parametrize("line", ["[1, 2]", '{"hello": 1}', "not json"])
def test_a_line_that_is_not_a_row_is_named(tmp_path, line):
    journal = tmp_path / "j.jsonl"
    journal.write_text(line + "\n" + json.dumps(
        {"task_id": "HumanEval/0", "repeat": 0, "status": "ok"}) + "\n")
    with pytest.raises(ConfigError, match=r"j\.jsonl:1: not a journal row"):
        read_journal(journal)
    resumed = _cli("--tasks", "HumanEval/0", "--journal", str(journal), "--resume")
    assert resumed.returncode == 2 and "j.jsonl:1: not a journal row" in resumed.stderr
    assert "Traceback" not in resumed.stderr


def test_resuming_another_runs_journal_is_refused(tmp_path):
    journal = tmp_path / "j.jsonl"
    assert _cli("--tasks", "HumanEval/1?", "--journal", str(journal)).returncode == 0
    before = journal.read_text()
    other = _cli("--tasks", "HumanEval/0", "--journal", str(journal), "--resume")
    assert other.returncode == 2, other.stdout
    assert "belongs to another run" in other.stderr
    assert "the tasks changed since this journal was written" in other.stderr
    more = _cli("--tasks", "HumanEval/1?", "--journal", str(journal), "--resume",
                "--repeats", "1")
    assert more.returncode == 0 and "10/10 rollouts" in more.stdout, more.stdout + more.stderr
    assert journal.read_text() == before  # refused before anything ran or was written


# ---- the header: what the run was ----------------------------------------------------------
def _tasks(prompt: str = "say hi", n: int = 2) -> list[dict]:
    return [{"id": f"t{i}", "prompt": prompt, "grader": {"type": "match", "expected": "hi"}}
            for i in range(n)]


async def hi_agent(sandbox, task):
    return "hi"


async def other_agent(sandbox, task):
    return "hi"


def _run(journal: Path, tasks=None, agent=hi_agent, runtime="local", **kwargs):
    import asyncio

    return asyncio.run(sandboxnb.run(tasks if tasks is not None else _tasks(), agent, runtime,
                                     journal=journal, progress=False, **kwargs))


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_first_line_records_what_the_run_was(tmp_path):
    journal = tmp_path / "j.jsonl"
    run = _run(journal, sandboxnb.Taskset(_tasks(), name="greet"), repeats=2,
               config={"resources": {"memory_mb": 256}})
    assert run.status == "done" and run.counts() == {"ok": 4}
    header, *rows = _lines(journal)
    assert header["sandboxnb_journal"] == 1 and len(rows) == 4
    assert header["taskset"] == "greet" and header["tasks"] == 2 and header["repeats"] == 2
    assert header["fingerprint"].startswith("sha256:") and len(header["fingerprint"]) == 71
    assert header["agent"] == f"{__name__}:hi_agent" and header["runtime"] == "local"
    assert header["config"]["resources"]["memory_mb"] == 256
    assert header["sandboxnb_version"] == sandboxnb.__version__
    assert header["created_at"].endswith("+00:00")
    loaded = sandboxnb.load(journal)  # the header is not a row
    assert len(loaded) == 4 and len(loaded.to_pandas()) == 4
    assert loaded.header == header


@pytest.mark.parametrize(("change", "named"), [
    ({"agent": other_agent}, f"agent '{__name__}:hi_agent' vs '{__name__}:other_agent'"),
    ({"tasks": _tasks("say hello")}, "the tasks changed since this journal was written: "
                                     "2 task(s): 't0', 't1' (prompt"),
    ({"tasks": _tasks(n=1)}, "the tasks changed since this journal was written: 1 task(s): "
                             "'t1' no longer in the taskset"),
    ({"tasks": sandboxnb.Taskset(_tasks(), name="other")}, "taskset 'tasks' vs 'other'"),
    ({"config": {"resources": {"memory_mb": 512}}}, "config resources.memory_mb None vs 512"),
    ({"repeats": 2, "runtime": "docker"}, "runtime 'local' vs 'docker'"),
])
def test_resuming_a_journal_of_another_run_names_what_differs(tmp_path, change, named):
    journal = tmp_path / "j.jsonl"
    _run(journal)
    before = journal.read_text()
    with pytest.raises(ConfigError) as caught:
        _run(journal, resume=True, **change)  # the check comes before any sandbox starts
    message = str(caught.value)
    assert named in message, message
    assert "choose a new journal path" in message and "resume='force'" in message
    assert journal.read_text() == before  # refused before anything ran or was written


def test_a_resumed_run_may_grow_and_its_header_says_so(tmp_path):
    journal = tmp_path / "j.jsonl"
    _run(journal, tasks=_tasks(n=1))
    run = _run(journal, tasks=_tasks(n=3), repeats=2, resume=True)  # tasks added, more repeats
    assert run.status == "done" and run.counts() == {"ok": 6} and len(run.plan.rollouts) == 5
    headers = [line for line in _lines(journal) if "sandboxnb_journal" in line]
    assert [(h["tasks"], h["repeats"]) for h in headers] == [(1, 1), (3, 2)]
    again = _run(journal, tasks=_tasks(n=3), repeats=2, resume=True)  # the newest header
    assert again.plan.rollouts == () and again.counts() == {"ok": 6}
    assert len(_lines(journal)) == 8  # nothing new: no third header
    with pytest.raises(ConfigError, match="repeats 2 vs 1"):
        _run(journal, tasks=_tasks(n=3), resume=True)


def test_force_resume_continues_and_records_the_new_run(tmp_path):
    journal = tmp_path / "j.jsonl"
    _run(journal, tasks=_tasks(n=1))
    run = _run(journal, tasks=_tasks(n=3), agent=other_agent, resume="force")
    assert run.status == "done" and run.counts() == {"ok": 3} and len(run.plan.rollouts) == 2
    headers = [line for line in _lines(journal) if "sandboxnb_journal" in line]
    assert len(headers) == 2 and headers[-1]["agent"].endswith(":other_agent")
    assert len(sandboxnb.load(journal)) == 3
    again = _run(journal, tasks=_tasks(n=3), agent=other_agent, resume=True)
    assert again.plan.rollouts == () and again.counts() == {"ok": 3}
    for bad in ("yes", 1, None):
        with pytest.raises(ConfigError, match=f"resume = {bad!r}: expected True, False or "
                                              "'force'"):
            _run(journal, resume=bad)


def test_a_journal_without_a_header_still_loads_and_resumes(tmp_path):
    """Journals written before the header existed: rows only."""
    journal = tmp_path / "old.jsonl"
    row = {"run_id": "r", "task_id": "t0", "repeat": 0, "provider": "local", "sandbox_id": "s",
           "status": "ok", "reward": 1.0, "error": None,
           "started_at": "2026-01-01T00:00:00+00:00", "acquire_s": 0.1, "rollout_s": 0.1,
           "release_s": 0.1, "duration_s": 0.3, "image": None, "cpu": None,
           "memory_mb": None, "gpu": None, "answer": "hi", "info": {}}
    journal.write_text(json.dumps(row) + "\n")
    assert len(sandboxnb.load(journal).to_pandas()) == 1 and sandboxnb.load(journal).header is None
    run = _run(journal, resume=True)
    assert run.counts() == {"ok": 2} and len(run.plan.rollouts) == 1
    header = _lines(journal)[1]  # from now on the journal says what the run was
    assert header["sandboxnb_journal"] == 1 and header["tasks"] == 2
    assert len(sandboxnb.load(journal)) == 2


_GOOD = {"task_id": "t0", "repeat": 0, "status": "ok"}


@pytest.mark.parametrize(("row", "named"), [
    ({**_GOOD, "task_id": 5}, "task_id = 5: expected a string"),
    ({**_GOOD, "repeat": "x"}, "repeat = 'x': expected an integer >= 0"),
    ({**_GOOD, "repeat": -1}, "repeat = -1: expected an integer >= 0"),
    ({**_GOOD, "repeat": True}, "repeat = True: expected an integer >= 0"),
    ({**_GOOD, "status": "fine"}, "status = 'fine': expected one of ok, error, timeout, cancelled"),
    ({**_GOOD, "reward": "abc"}, "reward = 'abc': expected a number or null"),
    ({**_GOOD, "started_at": "yesterday"}, "started_at = 'yesterday': expected an ISO 8601"),
    ({**_GOOD, "memory_mb": 1.5}, "memory_mb = 1.5: expected an integer or null"),
    ({**_GOOD, "duration_s": [1]}, "duration_s = [1]: expected a number or null"),
    ({**_GOOD, "info": "x"}, "info = 'x': expected an object or null"),
    ({"sandboxnb_journal": "one"}, "sandboxnb_journal = 'one': expected 1"),
    ({"sandboxnb_journal": 1, "repeats": "2"}, "repeats = '2': expected an integer >= 1"),
])
def test_a_row_with_a_wrong_field_type_is_named(tmp_path, row, named):
    journal = tmp_path / "j.jsonl"
    journal.write_text(json.dumps(_GOOD) + "\n" + json.dumps(row) + "\n")
    for read in (read_journal, sandboxnb.load):  # never a raw ValueError from pandas
        with pytest.raises(ConfigError) as caught:
            read(journal).to_pandas() if read is sandboxnb.load else read(journal)
        assert f"j.jsonl:2: {named}" in str(caught.value), str(caught.value)


def test_the_cli_names_the_difference_and_the_way_out(tmp_path):
    journal = tmp_path / "j.jsonl"
    assert _cli("--tasks", "HumanEval/0", "--journal", str(journal)).returncode == 0
    other = _cli("--tasks", "HumanEval/0", "--journal", str(journal), "--resume", "--cpu", "1")
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert "config resources.cpu None vs 1.0" in other.stderr, other.stderr
    assert "--force-resume" in other.stderr and "--journal PATH" in other.stderr
    forced = _cli("--tasks", "HumanEval/0", "--journal", str(journal), "--force-resume",
                  "--repeats", "2")
    assert forced.returncode == 0 and "2/2 rollouts" in forced.stdout, forced.stderr


# ---- one writer at a time ---------------------------------------------------------------------
async def gated_agent(sandbox, task):
    """Answers "hi"; with $SANDBOXNB_TEST_GATE set, first marks that it runs, then waits (bounded)
    until that file exists: a run held open while another one tries the same journal."""
    import asyncio
    import os

    gate = os.environ.get("SANDBOXNB_TEST_GATE")
    if gate:
        os.close(os.open(gate + ".running", os.O_CREAT | os.O_WRONLY, 0o644))
        for _ in range(2400):
            if os.access(gate, os.F_OK):
                break
            await asyncio.sleep(0.05)
    return "hi"


def _taskfile(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "greet.json"
    path.write_text(json.dumps(_tasks(n=n)))
    return path


def _run_cli(tasks: Path, journal: Path, *args: str, **popen) -> list[str]:
    return [sys.executable, "-m", "sandboxnb", "run", str(tasks), "--agent",
            f"{__name__}:gated_agent", "--runtime", "local", "--no-progress", "--journal",
            str(journal), *args]


def test_two_resumes_of_one_journal_never_both_run(tmp_path):
    """While one process resumes a journal, a second resume fails at once naming the first
    process and writes nothing; every rollout runs once."""
    import os

    from tests.helpers import wait_until

    tasks, journal, gate = _taskfile(tmp_path, 4), tmp_path / "j.jsonl", tmp_path / "gate"
    first = subprocess.run(_run_cli(tasks, journal, "--limit", "1"), capture_output=True,
                           text=True, timeout=300, check=False)
    assert first.returncode == 0, first.stderr
    env = {**os.environ, "SANDBOXNB_TEST_GATE": str(gate)}
    holder = subprocess.Popen(_run_cli(tasks, journal, "--resume"), env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: Path(str(gate) + ".running").exists() or holder.poll() is not None,
                   timeout=120, what="the first resume to be inside a rollout")
        assert holder.poll() is None, holder.communicate()
        before = journal.read_bytes()
        second = subprocess.run(_run_cli(tasks, journal, "--resume"), env=env,
                                capture_output=True, text=True, timeout=300, check=False)
        assert second.returncode == 2, second.stdout + second.stderr
        assert "Traceback" not in second.stderr
        assert str(journal) in second.stderr and "another run" in second.stderr, second.stderr
        assert f"pid {holder.pid}" in second.stderr, second.stderr
        assert journal.read_bytes() == before  # refused before anything ran or was written
    finally:
        gate.touch()
        out, err = holder.communicate(timeout=300)
    assert holder.returncode == 0, err
    assert "4/4 rollouts" in out, out
    rows = [line for line in _lines(journal) if "sandboxnb_journal" not in line]
    pairs = [(row["task_id"], row["repeat"]) for row in rows]
    assert sorted(pairs) == [(f"t{i}", 0) for i in range(4)]  # each rollout ran exactly once


def test_a_killed_writer_leaves_no_stale_lock(tmp_path):
    """The lock lives and dies with the writing process: after kill -9 the journal opens."""
    import signal

    from sandboxnb.journal import Journal

    journal = tmp_path / "j.jsonl"
    code = ("import sys; from sandboxnb.journal import Journal; j = Journal(sys.argv[1]); "
            "print('open', flush=True); sys.stdin.read()")
    writer = subprocess.Popen([sys.executable, "-c", code, str(journal)], text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert writer.stdout.readline().strip() == "open"
        with pytest.raises(ConfigError, match=rf"pid {writer.pid}\b"):
            Journal(journal)
        writer.send_signal(signal.SIGKILL)
        assert writer.wait(timeout=60) == -signal.SIGKILL
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait(timeout=60)
        writer.stdin.close()
        writer.stdout.close()
    Journal(journal).close()  # no stale lock


async def test_two_runs_of_one_journal_in_one_process_are_refused(tmp_path, monkeypatch):
    import asyncio

    from sandboxnb.plan import make_plan
    from sandboxnb.scheduler import Run

    journal, gate = tmp_path / "j.jsonl", tmp_path / "gate"
    await sandboxnb.run(_tasks(n=1), gated_agent, journal=journal, progress=False)
    stale = make_plan(_tasks(n=3), gated_agent, journal=journal, resume=True)
    monkeypatch.setenv("SANDBOXNB_TEST_GATE", str(gate))
    first = sandboxnb.start(_tasks(n=3), gated_agent, journal=journal, resume=True)
    try:
        with pytest.raises(ConfigError, match="another run") as caught:
            sandboxnb.start(_tasks(n=3), gated_agent, journal=journal, resume=True)
        assert str(journal) in str(caught.value)
        with pytest.raises(ConfigError, match="another run"):
            Run(stale).start()  # planned before the first run started
    finally:
        gate.touch()
        await asyncio.wait_for(first.wait(), 120)
    assert first.counts() == {"ok": 3}
    with pytest.raises(ConfigError, match="written since this run was planned"):
        Run(stale).start()  # its plan no longer matches the journal: it would run t1, t2 again
    assert len([ln for ln in _lines(journal) if "sandboxnb_journal" not in ln]) == 3


# ---- a journal with duplicate rows, a torn multibyte tail --------------------------------------
def test_resume_counts_each_rollout_once_like_load(tmp_path):
    journal = tmp_path / "j.jsonl"
    assert _cli("--tasks", "HumanEval/[0-5]", "--journal", str(journal)).returncode == 0
    header, *rows = journal.read_text().splitlines(keepends=True)
    # two rows written twice (a concurrent writer of old), one rollout missing
    journal.write_text(header + "".join(rows[:5]) + rows[0] + rows[1])
    resumed = subprocess.run([sys.executable, "-m", "sandboxnb", "run", "humaneval", "--agent",
                              "oracle", "--tasks", "HumanEval/[0-5]", "--journal", str(journal),
                              "--resume"], capture_output=True, text=True, timeout=300,
                             check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert "6/6 rollouts" in resumed.stdout, resumed.stdout
    assert "/8 " not in resumed.stderr and "| 6/6 [" in resumed.stderr, resumed.stderr
    assert len(sandboxnb.load(journal)) == 6 and sandboxnb.load(journal).total == 6


def test_a_tail_torn_inside_a_multibyte_character_is_cut(tmp_path):
    journal = tmp_path / "j.jsonl"
    assert _run(journal, tasks=_tasks(n=2)).counts() == {"ok": 2}
    whole = journal.read_bytes()
    # rows are written as ASCII JSON, but a journal may hold raw UTF-8 (edited, or from a tool)
    raw = json.dumps({"task_id": "t9", "repeat": 0, "status": "ok", "answer": "h\u00e9\u2713"},
                     ensure_ascii=False).encode("utf-8") + b"\n"
    cut = raw.index("\u2713".encode()) + 1  # inside the 3 bytes of the check mark
    journal.write_bytes(whole + raw[:cut])
    assert sorted(r["task_id"] for r in read_journal(journal)) == ["t0", "t1"]
    assert len(sandboxnb.load(journal)) == 2
    run = _run(journal, tasks=_tasks(n=3), resume=True)
    assert run.counts() == {"ok": 3} and len(run.plan.rollouts) == 1
    assert journal.read_bytes().startswith(whole) and journal.read_bytes().endswith(b"\n")
    assert len(sandboxnb.load(journal)) == 3


# ---- --journal none, and what a resume may change ------------------------------------------------
@pytest.mark.parametrize("none", ["none", "None"])
def test_journal_none_means_no_journal(tmp_path, none):
    done = subprocess.run([sys.executable, "-m", "sandboxnb", "run", "humaneval", "--agent",
                           "oracle", "--tasks", "HumanEval/0", "--no-progress", "--journal", none],
                          capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "1/1 rollouts" in done.stdout and "journal:" not in done.stdout
    assert list(tmp_path.iterdir()) == []  # no file named none, no ./runs
    resumed = subprocess.run([sys.executable, "-m", "sandboxnb", "run", "humaneval", "--agent",
                              "oracle", "--no-progress", "--journal", none, "--resume"],
                             capture_output=True, text=True, timeout=300, check=False,
                             cwd=tmp_path)
    assert resumed.returncode == 2 and "Traceback" not in resumed.stderr
    assert "--journal PATH" in resumed.stderr, resumed.stderr


def test_the_help_says_what_a_resume_may_change():
    shown = subprocess.run([sys.executable, "-m", "sandboxnb", "run", "--help"],
                           capture_output=True, text=True, timeout=120, check=True,
                           env={**__import__("os").environ, "COLUMNS": "200"}).stdout
    flat = " ".join(shown.split())
    journal = flat.split("--journal PATH JSONL", 1)[1].split("--resume continue", 1)[0]
    resume = flat.split("--resume continue", 1)[1].split("--force-resume continue", 1)[0]
    force = flat.split("--force-resume continue", 1)[1].split("--output", 1)[0]
    assert "none: no journal" in journal, journal
    assert "more tasks or more repeats" in resume, resume
    assert "repeats beyond --repeats" in force and "is refused even so" in force, force
