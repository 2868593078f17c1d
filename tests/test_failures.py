"""Failures are data: error rows say what failed and where, on real local sandboxes; the failed
rollouts of a run can be listed, retried into the same journal and compared with another run."""

from __future__ import annotations

import math

import pytest

import sandboxnb
from sandboxnb.failure import TRACEBACK_CHARS, TRACEBACK_LINES
from sandboxnb.tasks import Grade, Task

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
