"""The %sandbox / %%sandbox magics in an in-process IPython shell, against real local sandboxes."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

from sandboxnb.notebook.handle import SandboxHandle
from sandboxnb.notebook.magics import RemoteCellError, RemoteValue
from sandboxnb.notebook.reprs import ProvidersTable, SandboxTable
from sandboxnb.notebook.sandboxes import manager
from tests.helpers import live_sandbox_servers, processes_with, wait_until


@pytest.fixture
def ip():
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "sandboxnb")
    try:
        yield shell
    finally:
        shell.run_line_magic("unload_ext", "sandboxnb")
        shell.config.pop("SandboxMagics", None)


def test_launch_ls_stop(ip):
    ip.run_line_magic("sandbox", "launch local --name box --cpu 1 --memory-mb 256")
    handle = ip.user_ns["box"]
    assert isinstance(handle, SandboxHandle) and handle.state == "running"
    table = ip.run_line_magic("sandbox", "ls")
    assert isinstance(table, SandboxTable)
    (row,) = table.rows
    assert row["name"] == "box" and row["provider"] == "local" and row["state"] == "running"
    assert row["id"] == handle.id
    assert "cpu=1.0" in row["config"] and "memory_mb=256" in row["config"]
    assert "box" in repr(table) and "<table" in table._repr_html_()
    # top-level await on the handle works from the shell's own loop
    result = ip.run_cell("r = await box.exec('echo hi')")
    assert result.success, result.error_in_exec
    assert ip.user_ns["r"].stdout == "hi\n"
    ip.run_line_magic("sandbox", "stop box")
    assert "box" not in ip.user_ns
    assert ip.run_line_magic("sandbox", "ls").rows == []


def test_stop_all_and_default_names(ip):
    ip.run_line_magic("sandbox", "launch")
    ip.run_line_magic("sandbox", "launch local")
    assert {"sb1", "sb2"} <= set(ip.user_ns)
    assert len(ip.run_line_magic("sandbox", "ls")) == 2
    ip.run_line_magic("sandbox", "stop --all")
    assert manager().records() == []
    assert "sb1" not in ip.user_ns and "sb2" not in ip.user_ns


def test_config_defaults_apply(ip):
    ip.run_line_magic("config", "SandboxMagics.default_cpu = 0.5")
    ip.run_line_magic("config", "SandboxMagics.default_run_timeout_s = 600.0")
    ip.run_line_magic("sandbox", "launch --name cfg --startup-timeout 30")
    (row,) = ip.run_line_magic("sandbox", "ls").rows
    assert "cpu=0.5" in row["config"] and "run_timeout_s=600.0" in row["config"]
    assert "startup_timeout_s=30.0" in row["config"]
    config = ip.user_ns["cfg"].config
    assert config.limits.run_timeout_s == 600 and config.limits.startup_timeout_s == 30
    # a flag overrides a setting; none clears it (no limit)
    ip.run_line_magic("sandbox", "launch --name nolimit --run-timeout none --cpu 1")
    config = ip.user_ns["nolimit"].config
    assert config.limits.run_timeout_s is None and config.resources.cpu == 1


def test_run_timeout_flag_sets_the_sandbox_lifetime(ip):
    from sandboxnb.tasks import Task, Taskset

    ip.user_ns["one_task"] = Taskset([Task(id="t1", grader={"type": "match", "expected": "5.0"})],
                                     name="one")

    async def spy(sandbox, task):
        return str(sandbox.config.limits.run_timeout_s)

    ip.user_ns["spy"] = spy
    ip.run_line_magic("sandbox", "run one_task --agent spy --run-timeout 5 -o df")
    run = ip.user_ns["_sandbox_run"]
    assert run.status == "done"
    (row,) = run.rows
    assert row["status"] == "ok" and row["answer"] == "5.0" and row["reward"] == 1.0


def test_providers_table(ip):
    table = ip.run_line_magic("sandbox", "providers")
    assert isinstance(table, ProvidersTable)
    rows = {r["provider"]: r for r in table.rows}
    assert {"local", "docker", "modal", "daytona"} <= set(rows)
    assert rows["local"]["available"] is True
    assert "resources.cpu" in rows["local"]["supports"] or "resources" in rows["local"]["supports"]
    for row in rows.values():
        assert row["available"] or row["reason"], row
    assert "<table" in table._repr_html_()
    assert "transport" in repr(table) and "tls tunnel" in table._repr_html_()  # as the CLI


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("", "needs a subcommand"),
        ("bogus", "invalid choice"),
        ("launch nosuch", "not a known provider"),
        ("launch local --cpu -1", "resources.cpu"),
        ("launch local --cpu abc", r"argument --cpu: resources.cpu = 'abc': expected a number"),
        ("launch local --disk-mb 512", "local does not support resources.disk_mb"),
        ("launch local --run-timeout 0", "limits.run_timeout_s"),
        ("launch local --timeout 5", "ambiguous and no longer accepted: use --run-timeout"),
        ("launch local --memory-mb 0", "resources.memory_mb"),
        ("launch local --gpu A10G:2", "local does not support resources.gpu"),
        ("launch local --gpu ':x'", "GPU spec"),
        ("launch local --name 1bad", "valid Python identifier"),
        ("launch local --bogus 1", "unrecognized arguments"),
        ("launch local --replace", "--replace needs --name"),
        ("stop", "needs a sandbox NAME or --all"),
        ("stop nosuch", "no running sandbox named 'nosuch'"),
        ("stop x --all", "either a NAME or --all"),
        ("run humaneval", "required: --agent"),
        ("run nosuch.txt --agent oracle", "taskset"),
        ("run humaneval --agent oracle --max-concurrent 0", "--max-concurrent"),
        ("run humaneval --agent oracle --runtime nosuch", "not a known provider"),
        ("run humaneval --agent oracle --rollout-timeout 0", "--rollout-timeout"),
        ("run humaneval --agent oracle --disk-mb 512", "local does not support resources.disk_mb"),
        ("run humaneval --agent nosuch:thing", "agent"),
    ],
)
def test_line_usage_errors(ip, line, match):
    with pytest.raises(UsageError, match=match):
        ip.run_line_magic("sandbox", line)
    assert manager().records() == []
    assert live_sandbox_servers() == set()


def test_cell_usage_errors(ip):
    with pytest.raises(UsageError, match="no running sandbox and no provider"):
        ip.run_cell_magic("sandbox", "nosuch", "1")
    with pytest.raises(UsageError, match=r"resources\.cpu"):
        ip.run_cell_magic("sandbox", "local --cpu 0", "1")
    with pytest.raises(UsageError, match="expected a Python variable name"):
        ip.run_cell_magic("sandbox", "local -o 1x", "1")
    ip.run_line_magic("sandbox", "launch --name held")
    with pytest.raises(UsageError, match="apply only to a fresh sandbox"):
        ip.run_cell_magic("sandbox", "held --cpu 2", "1")
    with pytest.raises(UsageError, match="already running with another configuration"):
        ip.run_line_magic("sandbox", "launch --name held --cpu 1")


def test_cell_state_persists_and_streams(ip, capsys):
    ip.run_line_magic("sandbox", "launch --name py")
    assert ip.run_cell_magic("sandbox", "py", "x = 41\nprint('hello from the sandbox')") is None
    assert "hello from the sandbox" in capsys.readouterr().out
    value = ip.run_cell_magic("sandbox", "py -o res", "x + 1")
    assert isinstance(value, RemoteValue) and repr(value) == "42"
    assert ip.user_ns["res"].value == "42"
    # through run_cell the value is displayed like a local one
    result = ip.run_cell("%%sandbox py\n[x] * 2")
    assert result.success and "[41, 41]" in capsys.readouterr().out


def test_remote_exception_fails_the_cell(ip, capsys):
    ip.run_line_magic("sandbox", "launch --name err")
    result = ip.run_cell("%%sandbox err\ndef boom():\n    raise ValueError('bad value')\nboom()")
    assert not result.success
    assert isinstance(result.error_in_exec, RemoteCellError)
    out = capsys.readouterr()
    text = out.out + out.err
    assert "Remote traceback" in text and "ValueError: bad value" in text and "boom" in text
    # the namespace survives the error
    assert repr(ip.run_cell_magic("sandbox", "err", "boom.__name__")) == "'boom'"


def test_bash_cells(ip, capsys):
    ip.run_line_magic("sandbox", "launch --name sh")
    ip.run_cell_magic("sandbox", "sh --bash -o r", "echo out; echo err >&2; pwd > /tmp/x_$$")
    captured = capsys.readouterr()
    assert "out" in captured.out and "err" in captured.err
    assert ip.user_ns["r"].exit_code == 0 and ip.user_ns["r"].stdout == "out\n"
    result = ip.run_cell("%%sandbox sh --bash\nexit 3")
    assert not result.success and "exited with code 3" in str(result.error_in_exec)


def test_one_shot_cells_leave_nothing(ip, capsys):
    ip.run_cell_magic("sandbox", "local --bash --cpu 1", "echo one-shot")
    assert "one-shot" in capsys.readouterr().out
    assert repr(ip.run_cell_magic("sandbox", "", "6 * 7")) == "42"
    wait_until(lambda: not live_sandbox_servers(), 5, "the one-shot sandboxes' servers to exit")
    assert manager().records() == []


def test_interrupt_cancels_remote_work(ip):
    ip.run_line_magic("sandbox", "launch --name slow")
    marker = f"sleep {1000 + os.getpid() % 1000}.5"
    main = threading.get_ident()

    def interrupt() -> None:
        with contextlib.suppress(AssertionError):  # interrupt anyway; the test then fails
            wait_until(lambda: processes_with(marker), 20, f"{marker!r} to run")
        signal.pthread_kill(main, signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    began = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        ip.run_cell_magic("sandbox", "slow --bash", marker)
    assert time.monotonic() - began < 15
    wait_until(lambda: not processes_with(marker), 5,
               "the remote process to end (it must not survive the interrupt)")
    # the sandbox is still usable afterwards
    assert repr(ip.run_cell_magic("sandbox", "slow", "1 + 1")) == "2"


def test_run_humaneval_into_dataframe(ip):
    ip.run_line_magic("sandbox", "run humaneval --agent oracle --limit 3 --max-concurrent 3 -o df")
    df = ip.user_ns["df"]
    assert len(df) == 3
    assert set(df["status"]) == {"ok"} and df["reward"].tolist() == [1.0, 1.0, 1.0]
    assert ip.user_ns["_sandbox_run"].status == "done"


def test_unload_releases_every_sandbox():
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "sandboxnb")
    shell.run_line_magic("sandbox", "launch --name a")
    shell.run_line_magic("sandbox", "launch --name b")
    assert len(live_sandbox_servers()) >= 2
    shell.run_line_magic("unload_ext", "sandboxnb")
    wait_until(lambda: not live_sandbox_servers(), 5, "every sandbox server to exit at unload")
    assert "a" not in shell.user_ns and "b" not in shell.user_ns
    assert "sandbox" not in shell.magics_manager.magics["line"]
    assert "sandbox" not in shell.magics_manager.magics["cell"]


def test_rich_displays_are_registered_by_the_extension(ip):
    """Core classes keep plain reprs; the extension registers their HTML with IPython's
    formatters (no widget outside a kernel) and unloading removes it."""
    from sandboxnb.client import Sandbox
    from sandboxnb.plan import make_plan
    from sandboxnb.scheduler import Run

    assert not hasattr(Run, "_repr_html_") and not hasattr(Run, "_repr_mimebundle_")
    assert not hasattr(Sandbox, "_repr_html_")
    run = Run(make_plan([{"id": "a", "grader": {"type": "match", "expected": "1"}}], "oracle",
                        journal=None))
    data, _ = ip.display_formatter.format(run)
    assert data["text/plain"].startswith("<Run tasks ")
    assert "<b>sandboxnb run</b>" in data["text/html"] and "0/1 rollouts" in data["text/html"]
    assert not any("widget" in key for key in data)  # not a kernel: no live monitor
    ip.run_line_magic("sandbox", "launch --name shown")
    data, _ = ip.display_formatter.format(ip.user_ns["shown"].sandbox)
    assert "sandboxnb Sandbox" in data["text/html"] and "open" in data["text/html"]
    ip.run_line_magic("sandbox", "stop shown")
    ip.run_line_magic("unload_ext", "sandboxnb")
    try:
        data, _ = ip.display_formatter.format(run)
        assert "text/html" not in data
    finally:
        ip.run_line_magic("load_ext", "sandboxnb")  # the fixture unloads it again


def test_doctor_checks_a_provider_live(ip, capsys):
    ip.run_line_magic("sandbox", "doctor local")
    out = capsys.readouterr().out
    assert "local is healthy" in out and "[ok  ] teardown" in out
    assert ip.user_ns["_sandbox_doctor"].ok


def test_doctor_refuses_a_bad_option_before_anything_starts(ip):
    with pytest.raises(UsageError, match=r"local does not support resources\.disk_mb"):
        ip.run_line_magic("sandbox", "doctor local --disk-mb 1024")


def _server_of(sandbox_id: str) -> set[int]:
    return processes_with(sandbox_id) & live_sandbox_servers()


def test_launch_twice_reuses_then_replace_starts_anew(ip, capsys):
    """Running a notebook twice: the same named launch reuses the running sandbox; another
    configuration is refused (naming the difference) unless --replace."""
    ip.run_line_magic("sandbox", "launch local --name box --memory-mb 256")
    first = ip.user_ns["box"].id
    out = capsys.readouterr().out
    assert "`" not in out and "await box.exec(" in out and "%%sandbox box" in out
    assert "%sandbox stop box" in out
    del ip.user_ns["box"]
    ip.run_line_magic("sandbox", "launch local --name box --memory-mb 256")
    assert "already running with this configuration" in capsys.readouterr().out
    assert ip.user_ns["box"].id == first and len(manager().records()) == 1  # put back, reused
    with pytest.raises(UsageError, match=r"another configuration: memory_mb=256 \(asked: 512\)"
                       r".*add --replace"):
        ip.run_line_magic("sandbox", "launch local --name box --memory-mb 512")
    assert ip.user_ns["box"].id == first and ip.user_ns["box"].state == "running"
    old_server = _server_of(first)
    assert old_server
    ip.run_line_magic("sandbox", "launch local --name box --memory-mb 512 --replace")
    assert "stopped the previous box" in capsys.readouterr().out
    box = ip.user_ns["box"]
    assert box.id != first and box.config.resources.memory_mb == 512
    wait_until(lambda: not (old_server & live_sandbox_servers()), 10, "the old server to exit")
    assert [r.id for r in manager().records()] == [box.id]


def test_mistyped_sandbox_names_get_suggestions(ip):
    ip.run_line_magic("sandbox", "launch --name mybox")
    with pytest.raises(UsageError, match=r"\(did you mean 'mybox'\?\); running: mybox"):
        ip.run_cell_magic("sandbox", "mybx", "1")
    with pytest.raises(UsageError, match=r"no running sandbox named 'mybx' \(did you mean "
                                         r"'mybox'\?\)"):
        ip.run_line_magic("sandbox", "stop mybx")
    assert manager().names() == ["mybox"]


def test_usage_errors_show_the_usage_as_typed(ip):
    with pytest.raises(UsageError) as line_error:
        ip.run_line_magic("sandbox", "lauch")
    text = str(line_error.value)
    assert "::" not in text and "%%sandbox" not in text and "usage: %sandbox " in text
    with pytest.raises(UsageError) as cell_error:
        ip.run_cell_magic("sandbox", "--bogus", "1")
    text = str(cell_error.value)
    assert "::" not in text and "%%%" not in text and "usage: %%sandbox " in text


def test_ls_shows_a_sandbox_its_run_timeout_ended(ip):
    ip.run_line_magic("sandbox", "launch --name short --run-timeout 1")
    sandbox_id = ip.user_ns["short"].id
    assert _server_of(sandbox_id)

    def ended_row():
        (row,) = ip.run_line_magic("sandbox", "ls").rows
        return row if row["state"] == "ended" else None

    row = wait_until(ended_row, 30, "ls to show the sandbox ended")
    assert "run timeout" in row["error"] and "limits.run_timeout_s = 1 s" in row["error"]
    assert "ended (its run timeout ended it" in repr(ip.run_line_magic("sandbox", "ls"))
    assert not _server_of(sandbox_id)
    with pytest.raises(UsageError, match="sandbox short has ended: its run timeout"):
        ip.run_cell_magic("sandbox", "short", "1")
    with pytest.raises(AttributeError, match=r"has ended .*launch a new one"):
        ip.user_ns["short"].exec  # noqa: B018
    ip.run_line_magic("sandbox", "stop short")
    assert ip.run_line_magic("sandbox", "ls").rows == [] and "short" not in ip.user_ns
    # the name is free again
    ip.run_line_magic("sandbox", "launch --name short")
    assert ip.user_ns["short"].id != sandbox_id


def test_ls_shows_a_sandbox_whose_server_died(ip):
    import psutil

    ip.run_line_magic("sandbox", "launch --name doomed")
    sandbox_id = ip.user_ns["doomed"].id
    for pid in _server_of(sandbox_id):  # the jail's processes: one kill may end the others
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).kill()
    (row,) = ip.run_line_magic("sandbox", "ls").rows
    assert row["state"] == "ended" and "its server went away" in row["error"], row
    ip.run_line_magic("sandbox", "stop --all")
    assert manager().records() == [] and "doomed" not in ip.user_ns


def _plan_of_one():
    from sandboxnb.plan import make_plan

    return make_plan([{"id": "a", "grader": {"type": "match", "expected": "1"}}], "oracle",
                     journal=None)


def test_monitor_shows_one_final_state_after_a_late_cancel():
    """A Cancel click handled after the run ended (or racing with its end) never leaves
    "cancelling..." beside a finished run: the monitor shows the run's final status."""
    import asyncio

    from sandboxnb.notebook.widgets import Monitor
    from sandboxnb.scheduler import Run

    run = Run(_plan_of_one())
    asyncio.run(run.wait())
    assert run.status == "done"
    mon = Monitor(run)
    try:
        mon.cancel_button.click()
        assert "cancelling" not in mon.status.value and "<b>done</b>" in mon.status.value
        assert mon.cancel_button.disabled
    finally:
        mon.close()
    pending = Run(_plan_of_one())  # never started: a Cancel ends it at once
    mon = Monitor(pending)
    try:
        mon.cancel_button.click()
        assert pending.status == "cancelled"
        assert "<b>cancelled</b>" in mon.status.value, mon.status.value
    finally:
        mon.close()


def test_run_resume_needs_the_journal(ip):
    for flag in ("--resume", "--force-resume"):
        with pytest.raises(UsageError, match=f"{flag} continues an existing journal: give its "
                                             "path with --journal PATH"):
            ip.run_line_magic("sandbox", f"run humaneval --agent oracle --limit 2 {flag}")
    assert manager().records() == [] and not live_sandbox_servers()


def test_interrupted_run_binds_its_rows_and_resumes(ip, tmp_path, capsys):
    """SIGINT during `%sandbox run -o df` (in-process shell): df, _sandbox_run and one line; the
    journal path is printed when the run starts; --resume runs only what is missing."""
    import asyncio

    from sandboxnb.agents import oracle
    from sandboxnb.notebook.loop import Interrupted

    calls: list[str] = []
    hold = {"s": 600.0}

    async def slow(sandbox, task):
        calls.append(task.id)
        if task.id != "HumanEval/0":
            await asyncio.sleep(hold["s"])
        return await oracle(sandbox, task)

    ip.user_ns["slow"] = slow
    journal = tmp_path / "j.jsonl"
    line = f"run humaneval --agent slow --limit 4 --max-concurrent 2 -o df --journal {journal}"
    main = threading.get_ident()

    def interrupt() -> None:
        with contextlib.suppress(AssertionError):  # interrupt anyway; the test then fails
            wait_until(lambda: journal.exists() and journal.read_text().count("\n") >= 2, 30,
                       "HumanEval/0's row")
            wait_until(lambda: len(calls) >= 3, 30, "two slow rollouts in flight")
        signal.pthread_kill(main, signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(KeyboardInterrupt) as caught:
        ip.run_line_magic("sandbox", line)
    assert isinstance(caught.value, Interrupted) and type(caught.value).__name__ == \
        "KeyboardInterrupt"
    (shown,) = caught.value._render_traceback_()
    assert "interrupted: 1/4 rollouts finished (2 cancelled); 3 rows in df" in shown
    assert f"journal {journal}" in shown
    assert f"--journal {journal} --resume` runs the other 3" in shown
    assert f"journal: {journal}\n" in capsys.readouterr().out
    df, run = ip.user_ns["df"], ip.user_ns["_sandbox_run"]
    assert sorted(map(str, df["status"])) == ["cancelled", "cancelled", "ok"]
    assert run.status == "cancelled" and run.journal_path == journal
    # the line the message offers continues the run: only the 3 missing rollouts run
    hold["s"] = 0
    calls.clear()
    resume = shown.split("`")[1]
    assert resume.startswith("%sandbox run humaneval --agent slow --limit 4")
    ip.run_line_magic("sandbox", resume.removeprefix("%sandbox "))
    assert sorted(calls) == ["HumanEval/1", "HumanEval/2", "HumanEval/3"]
    out = capsys.readouterr().out
    assert f"journal: {journal} (resumed: 1 rows kept, 3 to run)" in out
    df = ip.user_ns["df"]
    assert len(df) == 4 and set(map(str, df["status"])) == {"ok"} and df["task_id"].is_unique
    assert ip.user_ns["_sandbox_run"].status == "done"
    assert not live_sandbox_servers()
