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
        assert "ok: <b>6</b>" in mon.counts.value
        assert "1.000" in mon.mean.value
        assert mon.histogram.value.count("<rect") == 10 and "6</title>" in mon.histogram.value
        assert mon.newest.value.count("<tr>") == 6  # header + 5 newest
        assert "done" in mon.status.value
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
