"""Launcher and monitor widgets driven without a browser: set traits, click buttons, and watch
real local sandboxes start and stop. A loop running on a thread of its own stands in for the
kernel loop, so button callbacks (made on the test thread) hand work to another thread's loop,
as they do from a kernel subshell."""

from __future__ import annotations

import asyncio
import re
import threading
import time

import pytest

import sandboxnb.notebook as nb
from sandboxnb.config import DEFAULT_IDLE_TIMEOUT_S
from sandboxnb.errors import ConfigError
from sandboxnb.notebook import loop, sandboxes
from sandboxnb.notebook.form import LauncherController
from sandboxnb.notebook.handle import SandboxHandle
from sandboxnb.notebook.widgets import Launcher, Monitor
from sandboxnb.options import OPTIONS
from sandboxnb.tasks import Taskset
from sandboxnb.tasksets import humaneval
from tests.helpers import live_sandbox_servers, processes_with, wait_until


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


def _servers_of(sandbox_id: str) -> set[int]:
    """The live server processes of one sandbox (a jailed one has a few)."""
    return processes_with(sandbox_id) & live_sandbox_servers()


def _row_text(row) -> list[str]:
    """The text of a row's cells (HTML tags removed), the button left out."""
    return [re.sub(r"<[^>]*>", "", getattr(c, "value", "")) for c in row.children[:-1]]


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
        ("run_timeout_s", "-5", "limits.run_timeout_s"),
        ("name", "1box", "not a valid Python identifier"),
    ],
)
def test_invalid_values_are_flagged_and_nothing_starts(field, value, message):
    ui = nb.launcher(provider="local", namespace={})
    widget = ui.name_field if field == "name" else ui.fields[field]
    widget.value = value
    ui.launch_button.click()
    assert message in ui.errors[field].value
    assert "nothing was started" in ui.status.value
    assert sandboxes.manager().records() == [] and _rows(ui) == []
    time.sleep(0.2)
    assert live_sandbox_servers() == set()
    # fixing the field clears the message on the next click (and launches)
    widget.value = {"cpu": "1", "memory_mb": "256"}.get(field, "")
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
    assert config.limits.startup_timeout_s is None
    assert config.limits.idle_timeout_s == DEFAULT_IDLE_TIMEOUT_S
    with pytest.raises(ConfigError, match="not a launcher field; accepted: provider, name, "
                                          "image"):
        nb.launcher(timeout=5)
    ui.close()


def test_launch_and_stop_buttons_drive_real_sandboxes():
    ui = nb.launcher(provider="local")
    ui.fields["memory_mb"].value = "256"
    ui.launch_button.click()
    ui.launch_button.click()
    wait_until(lambda: len(_rows(ui)) == 2 and all("running" in _row_text(r) for r in _rows(ui)),
               30, what="two running rows")
    records = sandboxes.manager().records()
    assert {r.name for r in records} == {"sb1", "sb2"}
    assert all(_servers_of(r.id) for r in records)
    first = _rows(ui)[0]
    assert "sb1" in first.children[0].value and records[0].id in _row_text(first)
    assert "memory_mb=256" in " ".join(_row_text(first))
    assert "is running" in ui.status.value
    # Stop the first row
    first.children[-1].click()
    wait_until(lambda: len(_rows(ui)) == 1, 30, what="row removed")
    assert "sb2" in _rows(ui)[0].children[0].value
    wait_until(lambda: not _servers_of(records[0].id), 30, what="sb1's server to exit")
    assert _servers_of(records[1].id)
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


def _supported(provider: str) -> set[str]:
    from sandboxnb.providers import get_provider

    return set(get_provider(provider).supported)


@pytest.mark.parametrize("provider", ["local", "docker", "modal", "daytona"])
def test_fields_a_provider_does_not_honour_are_disabled_with_the_reason(provider):
    """Each provider's own ``supported`` fields decide: the others are disabled, say why, and
    are left out of the launch."""
    ui = nb.launcher(provider="local", namespace={})
    ui.provider.value = provider
    supported = _supported(provider)
    for opt in OPTIONS:
        honoured = opt.path in supported or opt.path.split(".")[0] in supported
        assert ui.fields[opt.name].disabled is not honoured, (provider, opt.name)
        note = ui.errors[opt.name].value
        if honoured:
            assert note == ""
        else:
            assert f"{provider} does not support {opt.path}; it honours: " in note
            assert opt.name not in ui.values()
    ui.close()


def test_a_disabled_field_keeps_its_value_and_is_not_used():
    ui = nb.launcher(provider="modal", namespace={})
    ui.fields["gpu"].value = "A10G:0"
    assert "resources.gpu.count" in ui.controller.validate(ui.values())["gpu"]
    ui.provider.value = "local"  # local has no GPUs: the field is off, its text kept
    assert ui.fields["gpu"].disabled and ui.fields["gpu"].value == "A10G:0"
    assert "gpu" not in ui.controller.validate(ui.values())
    ui.close()


def test_a_launched_sandbox_lands_in_the_namespace_and_the_widget_says_how_to_use_it():
    namespace: dict = {}
    ui = nb.launcher(provider="local", name="box", memory_mb=256, namespace=namespace)
    ui.launch_button.click()
    wait_until(lambda: "box" in namespace, 30, what="box in the namespace")
    handle = namespace["box"]
    assert isinstance(handle, SandboxHandle) and handle.state == "running"
    assert loop.submit(handle.exec("echo hi")).result(30).stdout == "hi\n"
    status = ui.status.value
    for usage in ("await box.exec(&quot;ls&quot;)", "%%sandbox box", "%sandbox stop box"):
        assert usage in status, status
    # launching again with the same form reuses it; another configuration is refused
    ui.launch_button.click()
    assert "already running with this configuration: reused" in ui.status.value
    assert [r.id for r in sandboxes.manager().records()] == [handle.id]
    ui.fields["memory_mb"].value = "512"
    ui.launch_button.click()
    assert "memory_mb=256 (asked: 512)" in ui.errors["name"].value
    assert "nothing was started" in ui.status.value
    # Stop removes the variable
    _rows(ui)[0].children[-1].click()
    wait_until(lambda: "box" not in namespace and _rows(ui) == [], 30, what="box stopped")
    ui.close()


def test_the_table_has_headers_and_live_ages():
    ui = nb.launcher(provider="local", namespace={})
    ui.launch_button.click()
    wait_until(lambda: [r.state for r in sandboxes.manager().records()] == ["running"], 30,
               what="launch")
    header = ui.table.children[0]
    assert "sandboxnb-header" in header._dom_classes
    titles = [c.value for c in header.children]
    assert titles == [f"<b>{t}</b>" for t in ("name", "provider", "id", "age", "config",
                                             "state")]
    (record,) = sandboxes.manager().records()
    age = _rows(ui)[0].children[3]
    record.started_at -= 3600  # an hour old: the next tick shows it, with no other change
    wait_until(lambda: age.value == "1h00m", 10, what="the age to be updated live")
    ui.close()


def test_the_table_shows_a_sandbox_that_ended_on_its_own():
    ui = nb.launcher(provider="local", run_timeout_s=1, namespace={})
    ui.launch_button.click()
    wait_until(lambda: _rows(ui) and "ended" in _row_text(_rows(ui)[0])[-1], 30,
               what="the row to show the sandbox ended")
    assert "run timeout" in _row_text(_rows(ui)[0])[-1]
    assert "ended" in ui.status.value and not live_sandbox_servers()
    remove = _rows(ui)[0].children[-1]
    assert remove.description == "Remove"
    remove.click()
    wait_until(lambda: _rows(ui) == [], 10, what="the ended row to go")
    ui.close()


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
