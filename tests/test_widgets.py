"""Launcher and monitor widgets driven without a browser: set traits, click buttons, and watch
real local sandboxes start and stop. A loop running on a thread of its own stands in for the
kernel loop, so button callbacks (made on the test thread) hand work to another thread's loop,
as they do from a kernel subshell."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import sandboxnb.notebook as nb
from sandboxnb.errors import ConfigError
from sandboxnb.notebook import loop, sandboxes
from sandboxnb.notebook.form import LauncherController
from sandboxnb.notebook.widgets import Launcher, Monitor
from sandboxnb.tasks import Taskset
from sandboxnb.tasksets import humaneval
from tests.helpers import live_sandbox_servers, wait_until


@pytest.fixture(autouse=True)
def kernel_loop():
    """A running loop recorded as the kernel loop; everything on it is released afterwards."""
    ready = threading.Event()
    holder: dict[str, asyncio.AbstractEventLoop] = {}

    def run() -> None:
        holder["loop"] = asyncio.new_event_loop()
        holder["loop"].call_soon(ready.set)
        holder["loop"].run_forever()

    thread = threading.Thread(target=run, name="test-kernel-loop", daemon=True)
    thread.start()
    assert ready.wait(10)
    running = holder["loop"]
    loop.remember_kernel_loop(running)
    try:
        yield running
    finally:
        sandboxes.release_all()
        loop.forget_kernel_loop()
        running.call_soon_threadsafe(running.stop)
        thread.join(10)
        running.close()


def _rows(ui: Launcher):
    return [c for c in ui.table.children if "sandboxnb-row" in c._dom_classes]


def _row_text(row) -> list[str]:
    return [getattr(c, "value", "") for c in row.children[:-1]]


def test_provider_dropdown_marks_unavailable_ones():
    ui = nb.launcher(provider="local")
    labels = dict((value, label) for label, value in ui.provider.options)
    assert labels["local"] == "local"
    info = {r["provider"]: r for r in ui.controller.providers}
    for name, row in info.items():
        if not row["available"]:
            assert labels[name].endswith("(unavailable)")
            ui.provider.value = name
            assert ui.launch_button.disabled
            assert row["reason"][:20] in ui.errors["provider"].value
    ui.provider.value = "local"
    assert not ui.launch_button.disabled


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("cpu", "-1", "resources.cpu"),
        ("cpu", "abc", "resources.cpu = &#x27;abc&#x27;: expected a number &gt;= 0.01"),
        ("memory_mb", "0", "resources.memory_mb"),
        ("disk_mb", "1024", "local does not support resources.disk_mb"),
        ("gpu", "A10G", "local does not support resources.gpu"),
        ("gpu", "A10G:0", "resources.gpu.count"),
        ("run_timeout_s", "-5", "limits.run_timeout_s"),
    ],
)
def test_invalid_values_are_flagged_and_nothing_starts(field, value, message):
    ui = nb.launcher(provider="local")
    ui.fields[field].value = value
    ui.launch_button.click()
    assert message in ui.errors[field].value
    assert "nothing was started" in ui.status.value
    assert sandboxes.manager().records() == [] and _rows(ui) == []
    time.sleep(0.2)
    assert live_sandbox_servers() == set()
    # fixing the field clears the message on the next click (and launches)
    ui.fields[field].value = {"cpu": "1", "memory_mb": "256"}.get(field, "")
    ui.launch_button.click()
    assert ui.errors[field].value == ""
    wait_until(lambda: [r.state for r in sandboxes.manager().records()] == ["running"], 30,
               what="launch")


def test_form_fields_take_defaults_and_none():
    ui = nb.launcher(provider="local", memory_mb=256, run_timeout_s=600.0)
    assert ui.fields["memory_mb"].value == "256" and ui.fields["run_timeout_s"].value == "600"
    assert ui.fields["cpu"].value == "" and "default" in ui.fields["cpu"].placeholder
    assert "60" in ui.fields["startup_timeout_s"].placeholder
    ui.fields["startup_timeout_s"].value = "none"
    config = ui.controller.config(ui.values())
    assert config.resources.memory_mb == 256 and config.limits.run_timeout_s == 600
    assert config.limits.startup_timeout_s is None and config.limits.idle_timeout_s == 300
    with pytest.raises(ConfigError, match="not a launcher field; accepted: provider, image"):
        nb.launcher(timeout=5)
    ui.close()


def test_launch_and_stop_buttons_drive_real_sandboxes():
    ui = nb.launcher(provider="local")
    ui.fields["memory_mb"].value = "256"
    ui.launch_button.click()
    ui.launch_button.click()
    wait_until(lambda: len(_rows(ui)) == 2 and all("running" in _row_text(r) for r in _rows(ui)),
               30, what="two running rows")
    assert len(live_sandbox_servers()) == 2
    records = sandboxes.manager().records()
    assert {r.name for r in records} == {"sb1", "sb2"}
    first = _rows(ui)[0]
    assert "sb1" in first.children[0].value and records[0].id in _row_text(first)
    assert "memory_mb=256" in " ".join(_row_text(first))
    assert "is running" in ui.status.value
    # Stop the first row
    first.children[-1].click()
    wait_until(lambda: len(_rows(ui)) == 1, 30, what="row removed")
    assert "sb2" in _rows(ui)[0].children[0].value
    wait_until(lambda: len(live_sandbox_servers()) == 1, 30, what="server exit")
    _rows(ui)[0].children[-1].click()
    wait_until(lambda: _rows(ui) == [], 30, what="table empty")
    wait_until(lambda: not live_sandbox_servers(), 30, what="all servers gone")


def test_launcher_and_magics_share_sandboxes():
    ui = Launcher(LauncherController())
    other = Launcher(LauncherController())
    ui.launch_button.click()
    wait_until(lambda: len(_rows(other)) == 1, 30, what="second view updated")
    sandboxes.manager().stop_all()
    wait_until(lambda: _rows(ui) == [] and _rows(other) == [], 30, what="both views cleared")


def _start_run(n: int, max_concurrent: int):
    import sandboxnb.scheduler as sched

    tasks = Taskset(list(humaneval.load())[:n], name=f"humaneval-{n}")

    async def begin():
        return sched.start(tasks, "oracle", "local", max_concurrent=max_concurrent)

    return loop.submit(begin()).result(30)


def _finish(run) -> None:
    if not run.done():
        run.cancel()
        wait_until(lambda: run.done(), 30, what="run cancelled")


def test_callbacks_hand_work_to_the_kernel_loop(kernel_loop):
    ui = nb.launcher(provider="local")
    ui.launch_button.click()
    wait_until(lambda: [r.state for r in sandboxes.manager().records()] == ["running"], 30,
               what="launch")
    (record,) = sandboxes.manager().records()
    assert record.loop is kernel_loop
    assert record.sandbox._heartbeat_task.get_loop() is kernel_loop

    async def where() -> str:
        await record.sandbox.ping()
        return threading.current_thread().name

    assert loop.submit(where()).result(10) == "test-kernel-loop"


def test_monitor_follows_a_run():
    run = _start_run(6, 3)
    try:
        mon = nb.monitor(run)
        assert isinstance(mon, Monitor)
        wait_until(lambda: run.done(), 120, what="run end")
        wait_until(lambda: mon.cancel_button.disabled, 30, what="monitor sees the end")
        assert mon.progress.value == mon.progress.max == 6
        assert mon.progress.bar_style == "success"
        assert "ok 6" in mon.counts.value and "sandboxnb-count-ok" in mon.counts.value
        assert "1.000</b> over 6 rollouts" in mon.mean.value and "graded" not in mon.mean.value
        assert mon.histogram.value.count("<rect") == 10 and ">6</text>" in mon.histogram.value
        assert "reward (n=6)" in mon.histogram.value
        assert "duration (n=6)" in mon.durations.value
        shown = [v for v in mon.newest_rows if v.box.layout.display != "none"]
        assert len(shown) == 5 and all(">1.0<" in v.cells.value for v in shown)  # as pandas
        assert mon.errors_title.value == "" and "done" in mon.status.value
        # ended: one line; the rest behind "details"
        assert mon.body.layout.display == "none" and mon.compact.layout.display == ""
        assert "ok 6" in mon.compact.value and "6/6" in mon.compact.value
        mon.expand.value = True
        assert mon.body.layout.display == ""
    finally:
        _finish(run)


def test_monitor_cancel_stops_the_run_cleanly():
    run = _start_run(40, 2)
    try:
        mon = nb.monitor(run)
        wait_until(lambda: len(run.rows) >= 1, 60, what="first row")
        mon.cancel_button.click()
        wait_until(lambda: run.done(), 30, what="cancelled")
        assert run.status == "cancelled" and len(run.rows) < 40
        wait_until(lambda: "cancelled" in mon.status.value, 30, what="monitor shows cancelled")
        wait_until(lambda: not live_sandbox_servers(), 30, what="sandboxes released")
    finally:
        _finish(run)


def _start(tasks, agent, **kwargs):
    import sandboxnb.scheduler as sched

    async def begin():
        return sched.start(tasks, agent, "local", journal=None, **kwargs)

    return loop.submit(begin()).result(30)


def _numbered(n: int) -> list[dict]:
    return [{"id": f"t{i}", "prompt": str(i), "grader": {"type": "match", "expected": str(i)}}
            for i in range(n)]


async def _odd_fails(sandbox, task):
    await sandbox.exec(["echo", f"tried {task.id}"])
    if int(task.prompt) % 2:
        raise ConnectionError(f"model API hiccup on {task.id}")
    return task.prompt


def test_monitor_shows_failures_and_opens_a_rollout():
    run = _start(_numbered(6), _odd_fails, max_concurrent=3)
    try:
        mon = nb.monitor(run)
        wait_until(lambda: run.done(), 120, what="run end")
        wait_until(lambda: mon.cancel_button.disabled, 30, what="monitor sees the end")
        assert mon.progress.bar_style == "danger"  # not green: rollouts failed
        assert "sandboxnb-count-error" in mon.counts.value and "error 3" in mon.counts.value
        assert "--jp-error-color1" in mon.counts.value
        assert ("0.500</b> over 6 rollouts" in mon.mean.value
                and "errors and timeouts count 0; 1.000 over 3 graded" in mon.mean.value)
        assert "latest errors" in mon.errors_title.value and "3 failed" in mon.errors_title.value
        shown = [v for v in mon.error_rows if v.box.layout.display != "none"]
        assert sorted(v.row["task_id"] for v in shown) == ["t1", "t3", "t5"]
        assert all("ConnectionError: model API hiccup" in v.cells.value for v in shown)
        assert mon.detail_box.layout.display == "none"
        shown[0].button.click()  # open that rollout
        opened = shown[0].row["task_id"]
        assert mon.detail_box.layout.display == ""
        detail = mon.detail.value
        assert f"<b>{opened}</b>" in detail and "prompt" in detail and "traceback" in detail
        assert "in _odd_fails" in detail and f"tried {opened}" in detail
        assert "ConnectionError during agent" in detail
        mon.close_detail.click()
        assert mon.detail_box.layout.display == "none"
        assert "&#10008;" in mon.compact.value and "error 3" in mon.compact.value
    finally:
        _finish(run)


def test_monitor_names_a_stuck_rollout_and_keeps_ticking():
    async def agent(sandbox, task):
        if task.id == "t3":
            await sandbox.exec(["sleep", "60"])
        return task.prompt

    run = _start(_numbered(4), agent, max_concurrent=4)
    try:
        mon = nb.monitor(run)
        wait_until(lambda: len(run.rows) == 3, 60, what="all but the stuck rollout")
        # no row arrives any more: the tick alone moves the age on
        wait_until(lambda: "<code>t3</code> 2." in mon.oldest.value
                   or "<code>t3</code> 3." in mon.oldest.value, 30,
                   what="the oldest running rollout named with its age")
        assert "1 in flight" in mon.header.value and "3/4" in mon.header.value
        assert mon.progress.bar_style == "" and mon.body.layout.display == ""
    finally:
        _finish(run)
    wait_until(lambda: mon.progress.bar_style == "warning", 30, what="cancelled: not green")


def test_an_empty_monitor_says_no_rows_yet():
    from sandboxnb.plan import make_plan
    from sandboxnb.scheduler import Run

    run = Run(make_plan(_numbered(2), _odd_fails, journal=None))  # not started: no rows
    mon = nb.monitor(run)
    assert "no rows yet" in mon.histogram.value and "no rows yet" in mon.durations.value
    assert "no rows yet" in mon.counts.value and "no finished rollouts yet" in mon.mean.value
    assert "0/2" in mon.header.value and mon.progress.bar_style == ""
    run.cancel()
    assert run.done() and mon.progress.bar_style == "warning"
    mon.close()
