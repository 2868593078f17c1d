"""Failures are data: error rows say what failed and where, on real local sandboxes; the failed
rollouts of a run can be listed, retried into the same journal and compared with another run."""

from __future__ import annotations

import asyncio
import math

import pandas as pd
import pytest

import sandboxnb
from sandboxnb.agents import current_repeat
from sandboxnb.failure import TRACEBACK_CHARS, TRACEBACK_LINES
from sandboxnb.tasks import Task

from .helpers import wait_until_async

FAILURE_COLUMNS = ("error_type", "error", "phase", "traceback", "output_tail")


def _parse_answer(text: str) -> int:
    return int(text)  # the line a user wants to see in the traceback


async def chatty_agent(sandbox, task):
    await sandbox.exec(["sh", "-c", "echo agent-said-hello; echo agent-warned >&2"])
    return _parse_answer("not a number")


async def raising_grader(sandbox, task, answer):
    await sandbox.exec(["echo", "grader-looked"])
    raise KeyError("no-such-field")


async def fine_agent(sandbox, task):
    return "x"


@pytest.mark.parametrize("phase", ["setup", "agent", "grade"])
async def test_an_error_row_carries_type_phase_traceback_and_output(phase):
    task = Task(
        id="t", prompt="p",
        setup=["echo setup-ran; echo setup-broke >&2; exit 3"] if phase == "setup" else [],
        grader=raising_grader if phase == "grade" else {"type": "match", "expected": "x"},
    )
    agent = chatty_agent if phase == "agent" else fine_agent
    run = await sandboxnb.run([task], agent, "local", journal=None, progress=False)
    (row,) = run.rows
    assert row["status"] == "error" and row["phase"] == phase, row
    expected = {"setup": ("RuntimeError", "setup-broke", "setup-broke"),
                "agent": ("ValueError", "invalid literal for int()", "agent-warned"),
                "grade": ("KeyError", "no-such-field", "grader-looked")}[phase]
    error_type, cause, output = expected
    assert row["error_type"] == error_type
    assert row["error"].startswith(f"{phase}: {error_type}: ") and cause in row["error"]
    assert "\n" not in row["error"]
    assert output in row["output_tail"]
    tb = row["traceback"]
    assert tb.startswith("Traceback (most recent call last):") and cause in tb.splitlines()[-1]
    assert "sandboxnb/rollout.py" not in tb and "asyncio" not in tb  # the engine is left out
    if phase == "agent":
        assert "in chatty_agent" in tb and "in _parse_answer" in tb and "return int(text)" in tb
    if phase == "grade":
        assert "in raising_grader" in tb
    frame = run.to_pandas()
    for column in FAILURE_COLUMNS:
        assert column in frame.columns
    assert frame.loc[0, "phase"] == phase and frame.loc[0, "error_type"] == error_type


async def test_an_ok_row_has_no_failure_fields():
    run = await sandboxnb.run([Task(id="t", prompt="p", grader={"type": "match", "expected": "x"})],
                              fine_agent, "local", journal=None, progress=False)
    (row,) = run.rows
    assert row["status"] == "ok"
    assert all(row[c] is None for c in FAILURE_COLUMNS)


async def test_a_timeout_row_shows_where_the_agent_was_waiting():
    async def stuck_agent(sandbox, task):
        await sandbox.exec(["sh", "-c", "echo about-to-hang; sleep 30"])

    run = await sandboxnb.run([Task(id="t", prompt="p", grader={"type": "match", "expected": "x"})],
                              stuck_agent, "local", journal=None, timeout_s=1, progress=False)
    (row,) = run.rows
    assert row["status"] == "timeout" and row["phase"] == "agent"
    assert row["error_type"] in ("TimeoutError", "CancelledError")
    assert "in stuck_agent" in row["traceback"] and "about-to-hang" in row["output_tail"]
    assert math.isnan(row["reward"])


async def test_traceback_and_output_tail_are_bounded():
    def deep(n: int) -> None:
        if n == 0:
            raise RuntimeError("bottom " + "y" * 20_000)
        deep(n - 1)

    async def noisy_agent(sandbox, task):
        await sandbox.exec(["sh", "-c", "head -c 100000 /dev/zero | tr '\\0' x; echo; "
                                        "echo the-last-line"])
        deep(60)

    run = await sandboxnb.run([Task(id="t", prompt="p", grader={"type": "match", "expected": "x"})],
                              noisy_agent, "local", journal=None, progress=False)
    (row,) = run.rows
    tb = row["traceback"]
    assert len(tb.splitlines()) <= TRACEBACK_LINES + 2 and len(tb) <= TRACEBACK_CHARS + 100
    assert "earlier" in tb.splitlines()[0]  # says that it was cut
    assert len(row["output_tail"]) <= 2048 and row["output_tail"].endswith("the-last-line\n")
    assert len(row["error"]) <= 400


# -- errors(), retry(), compare() ----------------------------------------------------------------
def _tasks(n: int) -> list[dict]:
    return [{"id": f"t{i}", "prompt": str(i), "grader": {"type": "match", "expected": str(i)}}
            for i in range(n)]


def flaky_agent():
    """Fails on odd task numbers the first time it sees them (a user agent with a bug that a
    retry gets past), answers right otherwise."""
    seen: set[tuple[str, int]] = set()

    async def agent(sandbox, task):
        key = (task.id, current_repeat())
        first = key not in seen
        seen.add(key)
        await sandbox.exec(["echo", f"working on {task.id}"])
        if first and int(task.prompt) % 2:
            raise ConnectionError(f"model API hiccup on {task.id}")
        return task.prompt

    return agent


async def test_errors_lists_the_failed_rollouts(tmp_path):
    run = await sandboxnb.run(_tasks(6), flaky_agent(), "local", journal=tmp_path / "j.jsonl",
                              max_concurrent=3, progress=False)
    errors = run.errors()
    assert sorted(errors["task_id"]) == ["t1", "t3", "t5"]
    assert list(errors.columns) == ["task_id", "repeat", "status", "phase", "error_type", "error",
                                    "traceback", "output_tail", "duration_s", "sandbox_id"]
    assert set(errors["phase"]) == {"agent"} and set(errors["error_type"]) == {"ConnectionError"}
    assert all("working on t" in tail for tail in errors["output_tail"])
    assert run.results.score() == (0.5, 6) and run.mean_reward() == 1.0
    loaded = sandboxnb.load(tmp_path / "j.jsonl")
    assert sorted(loaded.errors()["task_id"]) == ["t1", "t3", "t5"]


async def test_retry_reruns_exactly_the_failed_rollouts_into_the_same_journal(tmp_path):
    journal = tmp_path / "j.jsonl"
    agent = flaky_agent()
    first = await sandboxnb.run(_tasks(6), agent, "local", journal=journal, repeats=2,
                                max_concurrent=4, progress=False)
    assert first.counts() == {"error": 6, "ok": 6}
    ok_before = {(r["task_id"], r["repeat"]): r["sandbox_id"] for r in first.rows
                 if r["status"] == "ok"}
    second = await first.retry()
    assert second is not first and second.status == "done"
    new_rows = second.rows[len(second.plan.previous):]
    assert sorted((r["task_id"], r["repeat"]) for r in new_rows) == sorted(
        (f"t{i}", k) for i in (1, 3, 5) for k in (0, 1))  # exactly the failed ones, once each
    assert second.counts() == {"ok": 12} and second.results.score() == (1.0, 12)
    frame = second.to_pandas()
    assert len(frame) == 12 and not frame.duplicated(["task_id", "repeat"]).any()
    kept = {(r["task_id"], r["repeat"]): r["sandbox_id"] for r in second.rows[:6]}
    assert kept == ok_before  # the rollouts that passed were not run again
    lines = [line for line in journal.read_text().splitlines() if '"task_id"' in line]
    assert len(lines) == 18  # the journal holds both attempts...
    loaded = sandboxnb.load(journal)  # ...and the loader keeps the latest row per rollout
    assert len(loaded) == 12 and loaded.counts() == {"ok": 12}
    pd.testing.assert_frame_equal(
        loaded.to_pandas().sort_values(["task_id", "repeat"]).reset_index(drop=True),
        frame.sort_values(["task_id", "repeat"]).reset_index(drop=True))
    nothing = await second.retry()  # nothing failed: a run with no rollouts
    assert nothing.status == "done" and nothing.counts() == {"ok": 12}


FAIL_ODD = {"on": True}


async def outage_agent(sandbox, task):
    """Fails on odd tasks while the outage lasts (a module-level agent: the same after a
    restart, as a notebook's agent is)."""
    if FAIL_ODD["on"] and int(task.prompt) % 2:
        raise ConnectionError("model API down")
    return task.prompt


async def test_retry_after_a_restart_from_the_journal(tmp_path, monkeypatch):
    journal = tmp_path / "j.jsonl"
    monkeypatch.setitem(FAIL_ODD, "on", True)
    await sandboxnb.run(_tasks(4), outage_agent, "local", journal=journal, progress=False)
    assert sandboxnb.load(journal).counts() == {"error": 2, "ok": 2}
    FAIL_ODD["on"] = False  # a new kernel, the outage over: only the journal is left
    fixed_agent = outage_agent
    again = await sandboxnb.run(_tasks(4), fixed_agent, "local", journal=journal, resume=True,
                                retry=("error", "timeout"), progress=False)
    assert len(again.rows) == 4 and again.counts() == {"ok": 4}
    assert sorted(r["task_id"] for r in again.rows[2:]) == ["t1", "t3"]
    assert sandboxnb.load(journal).counts() == {"ok": 4}
    with pytest.raises(ValueError, match=r"retry = .* resume = False"):
        sandboxnb.start(_tasks(4), fixed_agent, journal=journal, retry="error")
    with pytest.raises(ValueError, match=r"status = 'ok': expected one or more of error"):
        again.retry("ok")
    with pytest.raises(ValueError, match=r"max_concurrent = 0: expected an integer >= 1"):
        again.retry(max_concurrent=0)
    with pytest.raises(ValueError, match=r"timeout_s = -1: expected a number of seconds > 0"):
        again.retry(timeout_s=-1)


async def test_retry_of_a_running_run_is_refused():
    async def slow(sandbox, task):
        await sandbox.exec(["sleep", "30"])

    run = sandboxnb.start(_tasks(1), slow, "local", journal=None)
    try:
        with pytest.raises(RuntimeError, match="is running: wait for it to end"):
            run.retry()
    finally:
        run.cancel()
        await run.wait()


async def test_compare_two_runs_task_by_task(tmp_path):
    journal = tmp_path / "j.jsonl"
    before = await sandboxnb.run(_tasks(6), flaky_agent(), "local", journal=journal,
                                 progress=False)

    async def breaks_t0(sandbox, task):
        return "wrong" if task.id == "t0" else task.prompt

    after = await sandboxnb.run(_tasks(6) + _tasks(10)[9:], breaks_t0, "local",
                                journal=None, progress=False)
    result = sandboxnb.compare(before, after)
    table = result.table
    assert table.loc["t0", "change"] == "pass->fail"
    assert list(table[table["change"] == "fail->pass"].index) == ["t1", "t3", "t5"]
    assert table.loc["t9", "change"] == "only in b" and math.isnan(table.loc["t9", "reward_a"])
    assert table.loc["t1", "reward_a"] == 0.0 and table.loc["t1", "failed_a"] == 1
    assert result.totals == {"tasks": 7, "both": 6, "reward_a": 0.5, "reward_b": 5 / 6,
                             "passed_a": 3, "passed_b": 5, "pass->fail": 1, "fail->pass": 3,
                             "same": 2, "only in a": 0, "only in b": 1}
    assert "pass->fail 1, fail->pass 3" in repr(result) and "t0" in repr(result)
    # the same from a journal path and a DataFrame
    same = sandboxnb.compare(journal, after.to_pandas())
    assert same.totals == result.totals
    with pytest.raises(ValueError, match=r"b = int: expected a Run, Results"):
        sandboxnb.compare(before, 3)


# -- what the monitor reads ----------------------------------------------------------------------
async def test_monitor_snapshot_counts_denominators_and_the_oldest_running(tmp_path):
    from sandboxnb.notebook.monitor_state import MonitorState

    release = asyncio.Event()

    async def agent(sandbox, task):
        if task.id == "t5":
            await release.wait()  # stuck until the test lets it go
        if task.id in ("t1", "t3"):
            raise ValueError(f"bad {task.id}")
        return task.prompt

    run = sandboxnb.start(_tasks(6), agent, "local", journal=None, max_concurrent=3)
    state = MonitorState(run)
    empty = state.snapshot()
    assert empty["done"] == 0 and empty["scored"] == 0 and empty["bar_style"] == ""
    await wait_until_async(lambda: len(run.rows) == 5, 60, "every task but the stuck one")
    await wait_until_async(lambda: run.in_flight() and run.in_flight()[0]["age_s"] > 0.5, 30,
                           "the stuck rollout to age")
    snap = state.snapshot()
    assert snap["done"] == 5 and snap["total"] == 6 and snap["in_flight"] == 1
    (oldest,) = snap["oldest"]
    assert oldest["task_id"] == "t5" and oldest["repeat"] == 0 and oldest["age_s"] > 0.5
    assert snap["counts"] == {"ok": 3, "error": 2} and list(snap["counts"]) == ["ok", "error"]
    assert (snap["score"], snap["scored"]) == (0.6, 5)  # errors count 0, over 5 rollouts
    assert (snap["mean_reward"], snap["graded"]) == (1.0, 3)
    newest_first = [r["task_id"] for r in reversed(run.rows) if r["status"] == "error"]
    assert snap["failed"] == 2 and [r["task_id"] for r in snap["errors"]] == newest_first
    assert snap["bar_style"] == "danger" and not snap["finished"]
    assert snap["rate"] > 0 and snap["eta_s"] > 0 and snap["elapsed_s"] > 0
    release.set()
    await run
    done = state.snapshot()
    assert done["finished"] and done["in_flight"] == 0 and done["oldest"] == [] and \
        done["eta_s"] == 0.0 and done["bar_style"] == "danger"
    assert run.in_flight() == []


# -- hostile or careless user code: each failure is a row and the run goes on ------------------
class _Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("no message for you")


def _deep_chain(depth: int) -> Exception:
    err = ValueError("root")
    for i in range(depth):
        try:
            raise RuntimeError(f"level {i}") from err
        except RuntimeError as new:
            err = new
    return err


async def careless_agent(sandbox, task):
    kind = task.id
    if kind == "exit":
        raise SystemExit(2)  # what argparse does on a bad argument
    if kind == "keyboard":
        raise KeyboardInterrupt
    if kind == "unprintable":
        raise _Unprintable()
    if kind == "chain":
        raise _deep_chain(1500)
    if kind == "surrogate":
        return "0" + b"\xff".decode("utf-8", "surrogateescape")
    return "fine"


async def float_grader(sandbox, task, answer):
    return 1.0  # not a Grade


async def test_careless_user_code_gives_rows_and_the_run_goes_on():
    tasks = [Task(id=kind, prompt="p", grader={"type": "match", "expected": "fine"})
             for kind in ("exit", "keyboard", "unprintable", "chain", "surrogate", "ok")]
    tasks.append(Task(id="float-grade", prompt="p", grader=float_grader))
    tasks.append(Task(id="inf-reward", prompt="p", grader={
        "type": "exec", "command": "echo '{\"reward\": 1e999}'"}))
    run = await sandboxnb.run(tasks, careless_agent, "local", journal=None, progress=False,
                              max_concurrent=4)
    assert run.status == "done"
    rows = {row["task_id"]: row for row in run.rows}
    assert rows["ok"]["status"] == "ok" and rows["ok"]["reward"] == 1.0
    assert rows["exit"]["error_type"] == "SystemExit" and rows["exit"]["phase"] == "agent"
    assert rows["exit"]["error"] == "agent: SystemExit: 2"
    assert rows["keyboard"]["error_type"] == "KeyboardInterrupt"
    assert "could not be made" in rows["unprintable"]["error"]
    assert rows["chain"]["phase"] == "agent" and "level 1499" in rows["chain"]["error"]
    assert rows["chain"]["traceback"]
    assert rows["float-grade"]["phase"] == "grade" and "expected a sandboxnb.tasks.Grade" in \
        rows["float-grade"]["error"]
    assert rows["inf-reward"]["phase"] == "grade" and "finite" in rows["inf-reward"]["error"]
    assert rows["surrogate"]["status"] == "ok" and rows["surrogate"]["reward"] == 0.0
    assert len(run.to_pandas()) == len(tasks)  # every text is valid UTF-8


STUBBORN = {"on": True}


async def stubborn_agent(sandbox, task):
    await sandbox.exec(["true"])
    while STUBBORN["on"]:  # swallows every cancellation, as a careless retry loop does
        try:
            await asyncio.sleep(0.05)
        except BaseException:
            continue


async def test_an_agent_that_swallows_cancellation_cannot_hold_its_sandbox(monkeypatch):
    """Cancelled, the agent keeps looping; after the grace the rollout stops waiting for it and
    releases its sandbox, and the run ends."""
    from sandboxnb import rollout as rollout_module

    monkeypatch.setattr(rollout_module, "USER_CANCEL_GRACE_S", 0.5)
    tasks = [Task(id=f"t{i}", prompt="p", grader={"type": "match", "expected": "x"})
             for i in range(2)]
    run = sandboxnb.start(tasks, stubborn_agent, "local", journal=None, progress=False)
    await wait_until_async(lambda: len(run.in_flight()) == 2, 30, "both rollouts to start")
    await asyncio.sleep(0.3)  # inside the agents' loops
    provider = run.plan.provider
    assert len(await provider.live_sandboxes()) == 2
    try:
        run.cancel()
        await asyncio.wait_for(run.wait(), 30)
        assert run.status == "cancelled" and run.counts() == {"cancelled": 2}
        assert await provider.live_sandboxes() == []
    finally:
        STUBBORN["on"] = False  # the abandoned agents end, so the test's loop can close
