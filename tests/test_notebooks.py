"""Every notebook in notebooks/ runs top to bottom in a real ipykernel, and Kernel > Interrupt of a
``%%sandbox`` cell ends it within seconds and leaves no remote process."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client import KernelManager
from nbclient import NotebookClient

from tests.helpers import (
    alive,
    descendants,
    live_sandbox_servers,
    processes_with,
    sandbox_server_pids,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CREDENTIAL_VARS = ("MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET", "MODAL_SERVER_URL", "MODAL_CONFIG_PATH",
                   "DAYTONA_API_KEY", "DAYTONA_API_URL", "DAYTONA_TARGET")


@pytest.fixture
def no_account(monkeypatch, tmp_path):
    """A kernel environment with no cloud credentials (the notebooks fall back to emulators)."""
    for var in CREDENTIAL_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.modal.toml either
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    return tmp_path


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, no_account):
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(no_account)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    assert not live_sandbox_servers()
    if path.stem == "quickstart":
        text = "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
                         for c in nb.cells if c.cell_type == "code" for o in c.outputs)
        assert "step 2 in pid" in text and "hello from" in text and "(10, " in text
        assert "40 rows -> df" in text
        assert any("image/png" in o.get("data", {}) for c in nb.cells
                   if c.cell_type == "code" for o in c.outputs)
    if path.stem == "failures":
        text = "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
                         for c in nb.cells if c.cell_type == "code" for o in c.outputs)
        assert "12/12 rollouts (error 6, ok 6); mean reward 0.500 over 12 rollouts" in text
        assert "in call_model" in text and "thinking about task-" in text
        assert "12/12 rollouts (ok 12); mean reward 1.000 over 12 rollouts" in text
        assert "12 rows for 12 tasks" in text
        assert "fail->pass 6" in text


def _execute(kc, code: str, timeout: float = 120) -> dict:
    reply = kc.execute_interactive(code, timeout=timeout, output_hook=lambda msg: None)
    return reply["content"]


def _ours_with(text: str) -> set[int]:
    """Processes below this test process whose command line contains ``text``."""
    return processes_with(text, among=descendants(os.getpid()))


def _kernel_servers(kernel_pid: int) -> set[int]:
    """Running sandbox servers below the kernel."""
    return alive(sandbox_server_pids()) & descendants(kernel_pid)


def _interrupt_and_time(km, kc, msg_id: str) -> tuple[float, dict]:
    began = time.monotonic()
    km.interrupt_kernel()
    while True:
        reply = kc.get_shell_msg(timeout=30)
        if reply["parent_header"].get("msg_id") == msg_id:
            return time.monotonic() - began, reply["content"]


@pytest.mark.slow
def test_interrupt_cancels_sandbox_cell(no_account):
    with _kernel() as (km, kc):
        setup = "%load_ext sandboxnb\n%sandbox launch local --name sb"
        assert _execute(kc, setup)["status"] == "ok"
        kernel_pid = km.provisioner.pid
        # 1) a one-shot Python cell: the whole sandbox must go away
        servers_before = _kernel_servers(kernel_pid)
        msg_id = kc.execute("%%sandbox local\nimport time\ntime.sleep(1000)")
        wait_until(lambda: _kernel_servers(kernel_pid) != servers_before, 30,
                   "the one-shot sandbox to start")
        time.sleep(1.0)  # let the cell reach time.sleep
        took, content = _interrupt_and_time(km, kc, msg_id)
        assert content["status"] == "error" and content["ename"] == "KeyboardInterrupt"
        assert took < 10, f"interrupt took {took:.1f}s"
        (shown,) = content["traceback"]  # one line, not the library's traceback
        assert "interrupted: remote work cancelled; the one-shot sandbox was released" in shown
        wait_until(lambda: _kernel_servers(kernel_pid) == servers_before, 5,
                   "the one-shot sandbox to end (it must not survive the interrupt)")
        # 2) a Python cell in the interactive sandbox: the worker stops, the namespace survives
        _ok_after_error(kc, "%%sandbox sb\nkept = 'yes'")
        msg_id = kc.execute("%%sandbox sb\nimport time\ntime.sleep(1000)")
        time.sleep(1.5)
        took, content = _interrupt_and_time(km, kc, msg_id)
        assert content["status"] == "error" and took < 10
        assert content["traceback"] == ["\x1b[33minterrupted: remote work cancelled; sandbox sb "
                                        "intact\x1b[0m"], content["traceback"]
        # 3) a shell cell: the remote process is killed
        marker = "sleep 1000.25"
        msg_id = kc.execute(f"%%sandbox sb --bash\n{marker}")
        wait_until(lambda: _ours_with(marker), 30, "the remote sleep to start")
        took, content = _interrupt_and_time(km, kc, msg_id)
        assert content["status"] == "error" and took < 10
        wait_until(lambda: not _ours_with(marker), 5,
                   "the remote process to end (it must not survive the interrupt)")
        _ok_after_error(kc, "%%sandbox sb\nkept", timeout=60)
        assert _execute(kc, "%unload_ext sandboxnb")["status"] == "ok"
        assert not _kernel_servers(kernel_pid)
    assert not live_sandbox_servers()


@contextlib.contextmanager
def _kernel():
    km = KernelManager(kernel_name="python3")
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        yield km, kc
    finally:
        kc.stop_channels()
        if km.is_alive():
            km.shutdown_kernel(now=False)


def _run(kc, code: str, timeout: float = 120) -> tuple[dict, str]:
    """Execute ``code``; return the reply content and the cell's text output."""
    parts: list[str] = []

    def hook(msg: dict) -> None:
        content = msg["content"]
        if msg["msg_type"] == "stream":
            parts.append(content["text"])
        elif msg["msg_type"] in ("execute_result", "display_data"):
            parts.append(content["data"].get("text/plain", "") + "\n")
        elif msg["msg_type"] == "error":
            parts.append(f"{content['ename']}: {content['evalue']}\n")

    reply = kc.execute_interactive(code, timeout=timeout, output_hook=hook)
    return reply["content"], "".join(parts)


def _ok(kc, code: str, timeout: float = 120) -> str:
    content, text = _run(kc, code, timeout)
    assert content["status"] == "ok", text
    return text


@pytest.mark.slow
def test_sandboxes_live_on_the_kernel_loop(no_account):
    """Magics, top-level await and widget callbacks share the kernel's own loop; the loop is made
    re-entrant only at the first blocking magic; heartbeats keep running between cells."""
    with _kernel() as (km, kc):
        text = _ok(kc, "import asyncio, threading, time\nimport sandboxnb\n%load_ext sandboxnb\n"
                       "print('patched:', hasattr(asyncio, '_nest_patched'))")
        assert "patched: False" in text
        _ok(kc, "%sandbox launch local --name sb")
        text = _ok(kc, "loop = asyncio.get_running_loop()\n"
                       "print('same loop:', sb.sandbox._heartbeat_task.get_loop() is loop)\n"
                       "print('threads:', sorted(t.name for t in threading.enumerate()))\n"
                       "r = await sb.exec('echo top-level')\nprint(r.stdout.strip())")
        assert "same loop: True" in text and "top-level" in text
        assert "sandboxnb" not in text.split("threads:")[1].split("\n")[0]
        # idle kernel: the heartbeat task keeps running (3 s interval, 6 s answer deadline)
        time.sleep(7)
        text = _ok(kc, "hb = sb.sandbox._heartbeat_task\n"
                       "print('alive:', not hb.done() and not sb.closed)\nawait sb.ping()")
        assert "alive: True" in text
        # a widget callback made on another thread while the kernel is idle
        _ok(kc, "ui = sandboxnb.launcher(provider='local')\n"
                "threading.Timer(0.3, ui.launch_button.click).start()")
        def launched_on_the_kernel_loop() -> bool:
            text = _ok(kc, "from sandboxnb.notebook.sandboxes import manager\n"
                           "print([(r.name, r.state, r.loop is asyncio.get_running_loop()) "
                           "for r in manager().records()])")
            return "('sb1', 'running', True)" in text

        wait_until(launched_on_the_kernel_loop, 30,
                   "sb1 running on the kernel loop after the click", interval=0.2)
        # an interrupt during streamed output (the loop is busy delivering it when the signal
        # arrives) leaves the connection usable
        msg_id = kc.execute("%%sandbox sb\nimport time\nwhile True:\n"
                            "    print('x' * 100, flush=True)\n    time.sleep(0.0005)")
        time.sleep(1.5)
        took, content = _interrupt_and_time(km, kc, msg_id)
        assert content["status"] == "error" and content["ename"] == "KeyboardInterrupt"
        assert took < 10
        text = _ok_after_error(kc, "print('after:', (await sb.exec('echo ok')).stdout.strip())\n"
                                   "%sandbox stop --all")
        assert "after: ok" in text
        assert not _kernel_servers(km.provisioner.pid)
    assert not live_sandbox_servers()


@pytest.mark.slow
def test_kernel_shutdown_cancels_background_runs(no_account):
    """A run started with ``sandboxnb.start`` is cancelled at kernel shutdown: in-flight
    rollouts are journaled as cancelled and their sandboxes are gone when the kernel is."""
    journal = no_account / "slow.jsonl"
    with _kernel() as (km, kc):
        kernel_pid = km.provisioner.pid
        _ok(kc, f"""import asyncio, sandboxnb
%load_ext sandboxnb
from sandboxnb.tasks import Taskset
from sandboxnb.tasksets import humaneval

async def slow(sandbox, task):
    await sandbox.exec('true')
    await asyncio.sleep(1000)

run = sandboxnb.start(Taskset(list(humaneval.load())[:5], name='h5'), slow, 'local',
                      max_concurrent=2, journal={str(journal)!r})""")
        wait_until(lambda: len(_kernel_servers(kernel_pid)) >= 2, 30,
                   "the run's sandboxes to start")
        time.sleep(0.5)  # let both rollouts reach the agent's sleep
        km.shutdown_kernel(now=False)
        assert not km.is_alive()
    # checked at once: the sandboxes went away with the kernel, not after it
    assert not alive(sandbox_server_pids() - {os.getpid()}) & descendants(os.getpid())
    rows = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "task_id" in r]  # rows, not the header
    assert [r["status"] for r in rows] == ["cancelled", "cancelled"], rows


def test_background_run_displays_as_live_monitor(no_account):
    """With the extension loaded, `run = sandboxnb.start(...)`, then `run` as a cell's value shows
    the monitor widget (registered with IPython's formatters, not a repr method of Run); the
    user keeps executing cells while it runs, and `await run` collects it."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in (
        "import sandboxnb\n"
        "%load_ext sandboxnb\n"
        "tasks = sandboxnb.Taskset.load('humaneval').select('HumanEval/1?')\n"
        "run = sandboxnb.start(tasks, 'oracle', max_concurrent=2, journal=None)",
        "run",
        "print('another cell while it runs:', run.status in ('running', 'done'))",
        "await run\nprint(run.summary())",
    )]
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(no_account)}})
    client.execute()
    shown = nb.cells[1].outputs[0]["data"]
    assert "application/vnd.jupyter.widget-view+json" in shown
    assert "text/plain" in shown and "<Run humaneval" in shown["text/plain"]
    assert "another cell while it runs: True" in nb.cells[2].outputs[0]["text"]
    assert "10/10 rollouts (ok 10); mean reward 1.000" in nb.cells[3].outputs[0]["text"]
    assert not live_sandbox_servers()


_SLOW_AGENT = """import asyncio, sandboxnb
%load_ext sandboxnb
from sandboxnb.agents import oracle
from sandboxnb.tasks import Taskset
from sandboxnb.tasksets import humaneval

tasks = Taskset(list(humaneval.load())[:{n}], name='h{n}')
FAST = {fast!r}     # these tasks answer at once; the others wait `pause` seconds
pause = 600
calls = []

async def slow(sandbox, task):
    calls.append(task.id)
    with open({marks!r}, 'a') as marks:  # the test process watches the agent start
        marks.write(task.id + '\\n')
    if task.id not in FAST:
        await asyncio.sleep(pause)
    return await oracle(sandbox, task)
"""


def _ok_after_error(kc, code: str, timeout: float = 120) -> str:
    """``_ok`` for the first cell after a failed one: a request that reaches the kernel before
    it stops aborting (its stop-on-error of the cells queued behind the failure) is aborted;
    send it again then."""
    result: list[str] = []

    def ran() -> bool:
        content, text = _run(kc, code, timeout)
        if content["status"] == "aborted":
            return False
        assert content["status"] == "ok", text
        result.append(text)
        return True

    wait_until(ran, 30, "the kernel to take cells again after the error", interval=0.2)
    return result[0]


def _journal_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "task_id" in r]


def _cancel_button_comm(kc, msg_id: str, timeout: float = 60) -> str:
    """The comm id of the Cancel button the cell ``msg_id`` displayed (what a browser clicks)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        if msg["msg_type"] != "comm_open" or msg["parent_header"].get("msg_id") != msg_id:
            continue
        state = msg["content"]["data"].get("state", {})
        if state.get("_model_name") == "ButtonModel" and state.get("description") == "Cancel":
            return msg["content"]["comm_id"]
    raise AssertionError("the monitor's Cancel button never appeared")


def _click(kc, comm_id: str) -> None:
    """The comm message a browser sends when a Button is clicked."""
    msg = kc.session.msg("comm_msg", {"comm_id": comm_id,
                                      "data": {"method": "custom", "content": {"event": "click"}}})
    kc.shell_channel.send(msg)


def _reply(kc, msg_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        reply = kc.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
        if reply["parent_header"].get("msg_id") == msg_id:
            return reply["content"]


@pytest.mark.slow
def test_cancel_click_stops_a_blocking_run(no_account):
    """The monitor's Cancel, clicked while `%sandbox run` blocks the cell, ends the run at once:
    the comm message is handled during the cell, not after it; df holds the rows so far."""
    journal = no_account / "cancel.jsonl"
    with _kernel() as (km, kc):
        _ok(kc, _SLOW_AGENT.format(n=40, fast=["HumanEval/0"], marks=str(no_account / "m")))
        msg_id = kc.execute(f"%sandbox run tasks --agent slow --max-concurrent 2 -o df "
                            f"--journal {journal}")
        comm_id = _cancel_button_comm(kc, msg_id)
        wait_until(lambda: len(_journal_rows(journal)) >= 1, 60, "one row to finish")
        wait_until(lambda: len((no_account / "m").read_text().split()) >= 3, 30,
                   "two slow rollouts in flight (in the agent)")
        began = time.monotonic()
        _click(kc, comm_id)
        content = _reply(kc, msg_id, timeout=60)
        took = time.monotonic() - began
        assert content["status"] == "ok", content
        assert took < 5, f"the run ended {took:.1f}s after the click (the rollouts sleep 600 s)"
        text = _ok(kc, "print(_sandbox_run.status, sorted(map(str, df['status'])))")
        # HumanEval/0 finished; the two rollouts in flight (1 and 2) were cancelled
        assert "cancelled ['cancelled', 'cancelled', 'ok']" in text, text
        assert not _kernel_servers(km.provisioner.pid)
    assert not live_sandbox_servers()


@pytest.mark.slow
def test_interrupt_keeps_the_rows_and_resume_finishes_the_run(no_account):
    """Kernel > Interrupt during `%sandbox run -o df` binds df and _sandbox_run, says so in one
    line, and `--resume` runs exactly the rollouts the journal does not hold yet."""
    journal = no_account / "interrupted.jsonl"
    fast = [f"HumanEval/{i}" for i in range(4)]
    line = f"%sandbox run tasks --agent slow --max-concurrent 3 -o df --journal {journal}"
    with _kernel() as (km, kc):
        marks = no_account / "marks"
        _ok(kc, _SLOW_AGENT.format(n=10, fast=fast, marks=str(marks)))
        msg_id = kc.execute(line)
        wait_until(lambda: len(_journal_rows(journal)) >= 4, 60, "the fast rows to finish")
        wait_until(lambda: len(marks.read_text().split()) >= 7, 30,
                   "three slow rollouts in flight (in the agent)")
        took, content = _interrupt_and_time(km, kc, msg_id)
        assert took < 10, f"interrupt took {took:.1f}s"
        assert content["status"] == "error" and content["ename"] == "KeyboardInterrupt"
        (shown,) = content["traceback"]  # one line, no library traceback
        assert "interrupted: 4/10 rollouts finished (3 cancelled)" in shown, shown
        assert "7 rows in df" in shown and str(journal) in shown and "--resume" in shown
        text = _ok_after_error(kc, "print(_sandbox_run.status, sorted(map(str, df['status'])))")
        assert f"cancelled {['cancelled'] * 3 + ['ok'] * 4}" in text, text
        # resume: only the 6 rollouts the journal lacks run (the cancelled ones again)
        text = _ok(kc, f"pause = 0\ncalls.clear()\n{line} --resume\n"
                       "print('calls', sorted(calls))", timeout=300)
        assert f"journal: {journal}" in text.splitlines()[0], text
        missing = sorted(f"HumanEval/{i}" for i in range(4, 10))
        assert f"calls {missing}" in text, text
        text = _ok(kc, "print(_sandbox_run.status, len(df), sorted(set(df['status'])), "
                       "df['task_id'].is_unique)")
        assert "done 10 ['ok'] True" in text, text
        assert not _kernel_servers(km.provisioner.pid)
    assert not live_sandbox_servers()
