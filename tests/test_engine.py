"""The engine end to end on the local provider: runs, rows, journal, failures, cancellation."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import threading

import pandas as pd
import pytest

import sandboxnb
from sandboxnb.agents import AgentError
from sandboxnb.config import ConfigError, UnsupportedFieldError
from sandboxnb.plan import make_plan
from sandboxnb.results import Results
from sandboxnb.runner import bounded
from sandboxnb.scheduler import Run
from sandboxnb.tasks import TaskError, Taskset

from .helpers import sandbox_server_pids, wait_until_async


async def echo_agent(sandbox, task):
    result = await sandbox.exec(["sh", "-c", f"printf %s {task.prompt}"])
    return result.stdout


async def failing_agent(sandbox, task):
    if task.id == "b":
        raise RuntimeError("agent blew up")
    return task.prompt


async def sleepy_agent(sandbox, task):
    await sandbox.exec(["sleep", "30"])
    return "late"


TASKS = [
    {"id": "a", "prompt": "42", "grader": {"type": "match", "expected": "42"}},
    {"id": "b", "prompt": "7", "grader": {"type": "match", "expected": "8"}},
    {
        "id": "c",
        "prompt": "hello",
        "files": {"data/input.txt": "hello"},
        "setup": ["test -f data/input.txt"],
        "grader": {"type": "exec", "command": 'test "$(cat $SANDBOXNB_ANSWER_FILE)" = hello'},
    },
    {
        "id": "d",
        "prompt": "3",
        "runtime": {"resources": {"memory_mb": 4096}},
        "grader": {
            "type": "python",
            "code": "import json,os\nv=int(open(os.environ['SANDBOXNB_ANSWER_FILE']).read())\n"
            "print(json.dumps({'reward': v / 4, 'seen': v}))",
        },
    },
]


async def test_json_taskset_graders_overrides_and_frame(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in TASKS))
    run = await sandboxnb.run(
        str(path),
        echo_agent,
        "local",
        config={"resources": {"memory_mb": 2048}},
        max_concurrent=2,
        progress=False,
    )
    assert run.status == "done"
    frame = run.to_pandas().set_index("task_id")
    assert frame.loc[["a", "b", "c", "d"], "reward"].tolist() == [1.0, 0.0, 1.0, 0.75]
    assert frame.loc["d", "memory_mb"] == 4096  # per-task override
    assert frame.loc["a", "memory_mb"] == 2048  # run config
    assert (frame["status"] == "ok").all()
    assert len(set(frame["sandbox_id"])) == 4  # a fresh sandbox per rollout
    for col in ("acquire_s", "rollout_s", "release_s", "duration_s"):
        assert (frame[col] > 0).all()
    assert isinstance(frame["status"].dtype, pd.CategoricalDtype)
    assert str(frame["started_at"].dt.tz) == "UTC"
    assert frame.loc["d", "info"] == {"seen": 3}


async def test_failing_rollout_becomes_a_row_and_the_run_goes_on(tmp_path):
    journal = tmp_path / "j.jsonl"
    run = await sandboxnb.run(
        TASKS[:2], failing_agent, max_concurrent=1, journal=journal, progress=False
    )
    rows = {r["task_id"]: r for r in run.rows}
    assert rows["a"]["status"] == "ok" and rows["a"]["reward"] == 1.0
    assert rows["b"]["status"] == "error"
    assert "agent blew up" in rows["b"]["error"] and math.isnan(rows["b"]["reward"])
    loaded = sandboxnb.load(journal)
    assert sorted(r["task_id"] for r in loaded.rows) == ["a", "b"]
    assert loaded.to_pandas()["reward"].isna().sum() == 1


async def test_timeout_status():
    run = await sandboxnb.run(TASKS[:1], sleepy_agent, timeout_s=0.5, progress=False)
    (row,) = run.rows
    assert row["status"] == "timeout" and "timeout_s=0.5" in row["error"]
    assert row["duration_s"] < 10


async def test_cancelling_a_run_releases_every_sandbox(tmp_path):
    tasks = [
        {"id": f"t{i}", "prompt": "x", "grader": {"type": "match", "expected": "x"}}
        for i in range(12)
    ]
    before = sandbox_server_pids()
    run = sandboxnb.start(tasks, sleepy_agent, max_concurrent=4, journal=tmp_path / "j.jsonl")
    await wait_until_async(lambda: len(sandbox_server_pids() - before) >= 4, 10,
                           "four sandboxes really running")
    run.cancel()
    await run.wait()
    assert run.status == "cancelled" and run.done()
    assert not (sandbox_server_pids() - before)  # nothing left, checked right away
    assert run.counts() == {"cancelled": 4}
    assert len(sandboxnb.load(tmp_path / "j.jsonl").rows) == 4


async def test_awaited_run_cancelled_from_outside_releases_sandboxes():
    tasks = [
        {"id": f"t{i}", "prompt": "x", "grader": {"type": "match", "expected": "x"}}
        for i in range(4)
    ]
    before = sandbox_server_pids()
    waiter = asyncio.ensure_future(sandboxnb.run(tasks, sleepy_agent, progress=False))
    await asyncio.sleep(1.0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not (sandbox_server_pids() - before)


async def test_resume_skips_finished_rollouts(tmp_path):
    journal = tmp_path / "j.jsonl"
    await sandboxnb.run(TASKS[:1], echo_agent, journal=journal, progress=False)
    with pytest.raises(FileExistsError, match="resume=True"):
        await sandboxnb.run(TASKS[:2], echo_agent, journal=journal, progress=False)
    resumed = await sandboxnb.run(
        TASKS[:2], echo_agent, journal=journal, resume=True, progress=False
    )
    assert resumed.total == 2 and len(resumed.rows) == 2
    assert [r["task_id"] for r in sandboxnb.load(journal).rows] == ["a", "b"]
    nothing_left = await sandboxnb.run(
        TASKS[:2], echo_agent, journal=journal, resume=True, progress=False
    )
    assert nothing_left.status == "done" and nothing_left.counts() == {"ok": 2}
    assert len(sandboxnb.load(journal)) == 2


def test_torn_last_journal_line_is_skipped(tmp_path):
    journal = tmp_path / "j.jsonl"
    journal.write_text(
        json.dumps({"task_id": "a", "repeat": 0, "status": "ok", "reward": 1.0})
        + "\n"
        + '{"task_id": "b", "rep'
    )
    assert [r["task_id"] for r in sandboxnb.load(journal).rows] == ["a"]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"runtime": "nowhere"}, ValueError, r"runtime = 'nowhere' is not a known provider"),
        ({"agent": "nonsense"}, AgentError, r"expected 'oracle', 'samples:PATH'"),
        ({"agent": "json:nope"}, AgentError, r"module 'json' has no 'nope'"),
        ({"agent": "samples:/no/such.jsonl"}, AgentError, r"cannot be read"),
        (
            {"taskset": "tasks.txt"},
            TaskError,
            r"taskset = 'tasks.txt' is not a registered taskset .*; accepted: humaneval",
        ),
        ({"taskset": [{"id": "x", "grader": {"type": "regex"}}]}, Exception, "regex"),
        ({"taskset": [{"id": "x"}, {"id": "x"}]}, TaskError, "duplicate task id"),
        ({"max_concurrent": 0}, ValueError, r"max_concurrent = 0: expected an integer >= 1"),
        ({"repeats": -1}, ValueError, r"repeats = -1"),
        ({"timeout_s": 0}, ValueError, r"timeout_s = 0"),
        (
            {"config": {"resources": {"gpu": "H100"}}},
            UnsupportedFieldError,
            r"local does not support resources.gpu",
        ),
        ({"config": {"resources": {"cpu": -1}}}, ConfigError, r"resources.cpu = -1"),
        (
            {"taskset": [{"id": "x", "runtime": {"resources": {"memory_mb": 0}}}]},
            TaskError,
            r"resources.memory_mb = 0",
        ),
    ],
)
async def test_bad_input_is_rejected_before_any_sandbox_starts(kwargs, error, match):
    args = {"taskset": TASKS[:1], "agent": echo_agent, "runtime": "local"} | kwargs
    before = sandbox_server_pids()
    with pytest.raises(error, match=match):
        await sandboxnb.run(args.pop("taskset"), args.pop("agent"), **args, progress=False)
    assert not (sandbox_server_pids() - before)


def test_sync_agent_is_refused():
    def agent(sandbox, task):
        return "x"

    with pytest.raises(AgentError, match="must be an async function"):
        sandboxnb.start(TASKS[:1], agent)


async def test_oracle_humaneval_subset_scores_full_reward():
    tasks = Taskset.load("humaneval").select("HumanEval/1?")
    run = await sandboxnb.run(tasks, "oracle", max_concurrent=4, repeats=2, progress=False)
    frame = run.to_pandas()
    assert len(frame) == 20 and (frame["reward"] == 1.0).all()
    assert sorted(frame["repeat"].unique()) == [0, 1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "humaneval"], "--agent"),
        (["run", "humaneval", "--agent", "oracle", "--runtime", "nowhere"], "not a known provider"),
        (["run", "humaneval", "--agent", "oracle", "--cpu", "-2"], "resources.cpu = '-2'"),
        (
            ["run", "humaneval", "--agent", "oracle", "--gpu", "H100"],
            "local does not support resources.gpu",
        ),
        (["run", "humaneval", "--agent", "oracle", "--output", "out.xlsx"], "use .jsonl, .csv"),
        (["run", "humaneval", "--agent", "oracle", "--tasks", "Nope/*"], "matches no task id"),
        (["run", "humaneval", "--agent", "oracle", "--max-concurrent", "0"],
         "--max-concurrent = '0'"),
        (["run", "missing.jsonl", "--agent", "oracle"], "cannot be read"),
    ],
)
def test_cli_usage_errors_exit_nonzero_with_a_clear_message(argv, message):
    proc = subprocess.run(
        [sys.executable, "-m", "sandboxnb", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert message in proc.stderr


def test_cli_providers_lists_all_four():
    proc = subprocess.run(
        [sys.executable, "-m", "sandboxnb", "providers"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    for name in ("local", "docker", "modal", "daytona"):
        assert name in proc.stdout
    assert "resources.memory_mb" in proc.stdout


async def test_a_failing_listener_does_not_stop_the_run(caplog):
    run = sandboxnb.start(TASKS[:2], echo_agent, journal=None)
    seen = []

    def broken(row):
        seen.append(row["task_id"])
        raise ValueError("display bug")

    run.subscribe(broken)
    await run
    assert run.status == "done" and len(run.rows) == 2 and len(seen) == 2
    assert "display bug" in caplog.text


async def test_attach_to_a_running_server_by_url_and_token(tmp_path):
    """A server started by hand (`python -m sandboxnb.server`) is reachable with attach();
    leaving the block disconnects but leaves the server running; a wrong token is refused."""
    from sandboxnb.errors import AuthenticationError

    env = dict(os.environ, SANDBOXNB_TOKEN="s3cret-token")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sandboxnb.server", "--port", "0", "--workdir", str(tmp_path),
        "--idle-timeout", "30", env=env, stdout=asyncio.subprocess.PIPE,
    )
    try:
        ready = json.loads((await proc.stdout.readline()).decode().split(" ", 1)[1])
        url = f"tcp://127.0.0.1:{ready['port']}"
        async with sandboxnb.attach(url, "s3cret-token") as sb:
            assert (await sb.exec("echo attached")).stdout == "attached\n"
        assert proc.returncode is None  # still serving
        with pytest.raises(AuthenticationError):
            async with sandboxnb.attach(url, "wrong"):
                pass
        async with sandboxnb.attach(url, "s3cret-token") as sb:
            assert (await sb.python("1 + 1")).value == "2"
    finally:
        proc.kill()
        await proc.wait()


# -- plan -------------------------------------------------------------------------------------
def _journal_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_plan_resume_keeps_finished_rows_and_plans_the_rest(tmp_path):
    """A resumed journal's ok/error/timeout rows are kept and not planned again; cancelled ones
    are planned again; a journal with rows of tasks this taskset lacks is refused."""
    journal = tmp_path / "j.jsonl"
    _journal_rows(journal, [
        {"task_id": "a", "repeat": 0, "status": "ok", "reward": 1.0},
        {"task_id": "a", "repeat": 1, "status": "error", "reward": None},
        {"task_id": "b", "repeat": 0, "status": "cancelled", "reward": None},
        {"task_id": "d", "repeat": 1, "status": "timeout", "reward": None},
    ])
    plan = make_plan(TASKS, echo_agent, "local", repeats=2, journal=journal, resume=True,
                     config={"resources": {"memory_mb": 2048}})
    planned = [(p.task.id, p.repeat) for p in plan.rollouts]
    assert planned == [("b", 0), ("b", 1), ("c", 0), ("c", 1), ("d", 0)]
    assert [(r["task_id"], r["repeat"]) for r in plan.previous] == [
        ("a", 0), ("a", 1), ("d", 1)]
    assert plan.total == 8 and plan.journal == journal
    memory = {p.task.id: p.config.resources.memory_mb for p in plan.rollouts}
    assert memory == {"b": 2048, "c": 2048, "d": 4096}  # the effective config per task
    _journal_rows(journal, [{"task_id": "gone", "repeat": 0, "status": "ok", "reward": 0.0}])
    with pytest.raises(ConfigError, match=r"task\(s\) that taskset .* does not have \('gone'\)"):
        make_plan(TASKS, echo_agent, "local", repeats=2, journal=journal, resume=True)


def test_plan_validates_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("SANDBOXNB_RUNS_DIR", str(tmp_path / "auto"))
    plan = make_plan(TASKS[:2], echo_agent)
    assert plan.journal is not None and plan.journal.parent == tmp_path / "auto"
    assert not (tmp_path / "auto").exists()  # opened only when the run starts
    assert [(p.task.id, p.repeat) for p in plan.rollouts] == [("a", 0), ("b", 0)]
    journal = tmp_path / "j.jsonl"
    _journal_rows(journal, [{"task_id": "a", "repeat": 0, "status": "ok"}])
    with pytest.raises(FileExistsError, match=r"journal = .* already holds results"):
        make_plan(TASKS[:2], echo_agent, journal=journal)
    with pytest.raises(ValueError, match=r"resume = True .* journal = None; accepted: the path"):
        make_plan(TASKS[:2], echo_agent, journal=None, resume=True)
    with pytest.raises(ValueError, match=r"journal = 3: expected a file path"):
        make_plan(TASKS[:2], echo_agent, journal=3)
    with pytest.raises(ValueError, match=r"timeout_s = True"):
        make_plan(TASKS[:2], echo_agent, timeout_s=True)


# -- runner -----------------------------------------------------------------------------------
async def test_bounded_runner_limits_concurrency_and_propagates_cancellation():
    active, peak, finished = 0, 0, []

    async def work(item):
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        try:
            await asyncio.sleep(0.02 if item < 10 else 30)
        finally:
            active -= 1
            finished.append(item)

    await bounded(list(range(10)), work, 3)
    assert peak == 3 and sorted(finished) == list(range(10))
    finished.clear()
    task = asyncio.create_task(bounded(list(range(10, 20)), work, 4))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sorted(finished) == [10, 11, 12, 13] and active == 0  # in flight: unwound; rest: never


async def test_bounded_runner_starts_nothing_after_a_lost_cancellation():
    """A cancellation swallowed below (Python 3.11's wait_for can lose one) still stops the lane
    before its next item."""
    started = []

    async def swallowing(item):
        started.append(item)
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            pass  # lost, as by the wait_for race

    task = asyncio.create_task(bounded(list(range(5)), swallowing, 1))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert started == [0]


async def test_bounded_runner_raises_the_failure_itself_after_unwinding_the_rest():
    unwound = []

    async def work(item):
        if item == 1:
            raise KeyError("boom")
        try:
            await asyncio.sleep(30)
        finally:
            unwound.append(item)

    with pytest.raises(KeyError, match="boom"):
        await bounded([0, 1, 2, 3], work, 3)
    assert sorted(unwound) == [0, 2]


# -- end of a run -----------------------------------------------------------------------------
async def test_the_end_of_a_run_can_be_awaited_checked_and_observed():
    loop_thread = threading.get_ident()
    seen, removed = [], []
    run = sandboxnb.start(TASKS[:2], echo_agent, journal=None)
    assert run.status == "running" and not run.done() and run.loop is asyncio.get_running_loop()
    run.add_done_callback(lambda r: seen.append((r.status, len(r.rows), threading.get_ident())))
    remove = run.add_done_callback(removed.append)
    remove()
    assert await run.wait() is run
    assert run.done() and run.status == "done" and run.wall_s is not None
    assert seen == [("done", 2, loop_thread)] and removed == []
    late = []
    run.add_done_callback(lambda r: late.append(r.status))  # already ended: called at once
    assert late == ["done"]
    assert await run is run


async def test_a_run_can_be_waited_for_from_another_thread_and_loop():
    run = sandboxnb.start(TASKS[:2], echo_agent, journal=None)

    def elsewhere():
        return asyncio.run(run.wait()).status

    assert await asyncio.to_thread(elsewhere) == "done"
    assert run.done()


async def test_cancelling_a_pending_run_ends_it_at_once():
    run = Run(make_plan(TASKS[:2], echo_agent, journal=None))
    ended = []
    run.add_done_callback(lambda r: ended.append(r.status))
    assert run.status == "pending" and not run.done()
    run.cancel()
    assert run.done() and run.status == "cancelled" and ended == ["cancelled"]
    assert (await run.wait()).rows == []
    run.start()  # an ended run does not start again
    assert run.loop is None


async def test_an_engine_failure_fails_the_run_and_wait_does_not_raise(monkeypatch):
    import sandboxnb.runner

    async def broken(*args, **kwargs):
        raise RuntimeError("engine bug")

    monkeypatch.setattr(sandboxnb.runner, "rollout", broken)
    run = sandboxnb.start(TASKS[:3], echo_agent, journal=None)
    await run.wait()
    assert run.status == "failed" and isinstance(run.error, RuntimeError) and run.done()
    with pytest.raises(RuntimeError, match="engine bug"):
        await run


# -- results ----------------------------------------------------------------------------------
async def test_load_gives_the_same_results_as_the_finished_run(tmp_path):
    journal = tmp_path / "j.jsonl"
    run = await sandboxnb.run(TASKS, failing_agent, journal=journal, repeats=2, progress=False)
    loaded = sandboxnb.load(journal)
    assert isinstance(loaded, Results) and isinstance(run.results, Results)
    assert loaded.counts() == run.counts() == {"error": 2, "ok": 6}
    assert loaded.mean_reward() == run.mean_reward() == pytest.approx((1 + 1 + 0.75) * 2 / 6)
    assert loaded.summary() == run.results.summary()
    assert run.summary().startswith(loaded.summary() + "; wall ")
    assert loaded.total == run.total == len(loaded) == 8
    assert loaded.run_id == run.id and loaded.provider == "local"
    pd.testing.assert_frame_equal(loaded.to_pandas(), run.to_pandas())


def test_results_statistics_on_rows():
    results = Results([
        {"task_id": "a", "status": "ok", "reward": 1.0},
        {"task_id": "b", "status": "error", "reward": None},
        {"task_id": "c", "status": "ok", "reward": 0.0},
        {"task_id": "d", "status": "timeout", "reward": math.nan},
    ], total=6, name="x")
    assert results.counts() == {"error": 1, "ok": 2, "timeout": 1}
    assert results.rewards() == [1.0, 0.0] and results.mean_reward() == 0.5
    assert [r["task_id"] for r in results.newest(2)] == ["d", "c"]
    assert results.score() == (0.25, 4)  # errors and timeouts count 0
    assert results.summary() == ("4/6 rollouts (error 1, ok 2, timeout 1); mean reward 0.250 "
                                 "over 4 rollouts (errors and timeouts count 0; 0.500 over 2 "
                                 "graded)")
    assert Results([{"task_id": "a", "status": "ok", "reward": 1.0}]).summary() == (
        "1/1 rollouts (ok 1); mean reward 1.000 over 1 rollouts")
    assert math.isnan(Results().mean_reward())
    assert Results().summary() == "0/0 rollouts (no rows); mean reward -"


@pytest.mark.parametrize("where", ["setup", "agent", "grade"])
async def test_an_error_row_names_the_phase_that_failed(tmp_path, where):
    from sandboxnb.tasks import Grade, Task

    async def agent(sandbox, task):
        if where == "agent":
            raise RuntimeError("the agent broke")
        return "x"

    async def grader(sandbox, task, answer):
        if where == "grade":
            raise RuntimeError("the grader broke")
        return Grade(1.0)

    setup = ["exit 3"] if where == "setup" else []
    task = Task(id="t", prompt="p", setup=setup, grader=grader)
    run = await sandboxnb.run([task], agent, "local", journal=None, progress=False)
    (row,) = run.rows
    assert row["status"] == "error" and row["error"].startswith(f"{where}: "), row["error"]


async def test_a_run_timeout_row_says_so():
    async def agent(sandbox, task):
        await sandbox.exec(["sleep", "30"])

    task = {"id": "t", "prompt": "p", "grader": {"type": "match", "expected": ""}}
    run = await sandboxnb.run([task], agent, "local", journal=None,
                              progress=False, config={"limits": {"run_timeout_s": 1}})
    (row,) = run.rows
    assert row["status"] == "timeout", row
    assert "limits.run_timeout_s = 1s during agent" in row["error"]
