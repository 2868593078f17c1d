"""JupyterLab in a real headless Chromium: run notebooks/widgets.ipynb, click Launch, watch the
sandbox's row appear, click Stop, watch it go. Needs /usr/bin/chromium (scripts/setup-browser)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.helpers import alive, descendants, sandbox_server_pids, wait_until

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _reap_browser_children() -> None:
    """Kill and reap chromium processes orphaned to us (we are their subreaper)."""

    def none_left() -> bool:
        left = []
        for child in psutil.Process().children():
            with contextlib.suppress(psutil.Error, OSError):
                if "chrom" not in child.name():
                    continue
                left.append(child.pid)
                if child.status() != psutil.STATUS_ZOMBIE:
                    child.kill()
                os.waitpid(child.pid, os.WNOHANG)
        return not left

    with contextlib.suppress(AssertionError):  # best effort, as before: give up after 5 s
        wait_until(none_left, 5, "chromium's orphans to be reaped", interval=0.1)


def _wait_kernels_idle(base: str, timeout: float = 300, stable_s: float = 3) -> None:
    idle_since: list[float] = []

    def idle_long_enough() -> bool:
        kernels = json.loads(_get(f"{base}/api/kernels"))
        if not all(k["execution_state"] == "idle" for k in kernels):
            idle_since.clear()
            return False
        if not idle_since:
            idle_since.append(time.monotonic())
        return time.monotonic() - idle_since[0] >= stable_s

    wait_until(idle_long_enough, timeout,
               f"the notebook to finish running (kernels idle for {stable_s:g} s)", interval=0.25)


def _set_subreaper(on: bool) -> None:
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(36, int(on), 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def _get(url: str, method: str = "GET", timeout: float = 5) -> bytes:
    request = urllib.request.Request(url, method=method)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


@pytest.fixture
def jupyterlab(tmp_path):
    """JupyterLab on 127.0.0.1 with an empty token, serving a copy of notebooks/widgets.ipynb."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(ROOT / "notebooks" / "widgets.ipynb", work / "widgets.ipynb")
    home = tmp_path / "home"
    home.mkdir()
    port = _free_port()
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(ROOT),
           "JUPYTER_CONFIG_DIR": str(home / ".jupyter"),
           "JUPYTER_RUNTIME_DIR": str(home / "runtime")}
    log = (tmp_path / "jupyterlab.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         "--IdentityProvider.token=", "--ServerApp.password=", f"--ServerApp.root_dir={work}",
         "--ServerApp.disable_check_xsrf=True", "--LabApp.news_url=",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         *(["--allow-root"] if os.geteuid() == 0 else [])],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        def answers() -> bool:
            try:
                _get(f"{base}/api/status")
                return True
            except OSError:
                if proc.poll() is not None:
                    raise AssertionError("JupyterLab exited") from None
                return False

        try:
            wait_until(answers, 60, "JupyterLab to answer", interval=0.2)
        except AssertionError:
            raise RuntimeError(
                "JupyterLab did not start:\n" + (tmp_path / "jupyterlab.log").read_text()
            ) from None
        yield base, proc
    finally:
        try:  # shut kernels down cleanly first: they release their sandboxes at exit
            for kernel in json.loads(_get(f"{base}/api/kernels")):
                _get(f"{base}/api/kernels/{kernel['id']}", method="DELETE", timeout=30)
        except OSError:
            pass
        tree = descendants(proc.pid) | {proc.pid}
        with_servers = tree & sandbox_server_pids()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        log.close()
        assert not alive(with_servers), "sandbox servers outlived the kernel"


def test_launch_and_stop_from_jupyterlab(jupyterlab, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: run `sudo scripts/setup-browser` (installs Debian's "
                    "chromium); this test never downloads a browser")
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import expect, sync_playwright

    base, server = jupyterlab
    shots = tmp_path / "screenshots"
    shots.mkdir()
    _set_subreaper(True)  # chromium's helpers get reaped here instead of lingering as zombies
    try:
        _drive_browser(base, server, shots, tmp_path, expect, sync_playwright,
                       PlaywrightTimeout)
    finally:
        _reap_browser_children()
        _set_subreaper(False)
    assert sorted(p.name for p in shots.iterdir()) == ["1-launcher.png", "2-running.png",
                                                        "3-stopped.png"]
    keep = ROOT / "test-output" / "browser"
    keep.mkdir(parents=True, exist_ok=True)
    for shot in shots.iterdir():
        shutil.copy(shot, keep / shot.name)


def _drive_browser(base, server, shots, tmp_path, expect, sync_playwright, PlaywrightTimeout):
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_FLAGS, viewport={"width": 1400, "height": 1000},
        )
        try:
            page = context.new_page()
            page.set_default_timeout(60_000)
            for attempt in range(3):  # a loaded machine can fail the first fetch
                page.goto(f"{base}/lab/tree/widgets.ipynb")
                try:
                    page.locator(".jp-Notebook").first.wait_for(timeout=60_000)
                    break
                except PlaywrightTimeout:
                    if attempt == 2:
                        raise
            select = page.locator(".jp-Dialog button", has_text="Select")
            with contextlib.suppress(PlaywrightTimeout):  # "Select Kernel" shows on first open
                select.first.click(timeout=15_000)
            page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").first.wait_for(
                timeout=90_000
            )
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()

            launch = page.locator(".sandboxnb-launch").first
            launch.wait_for(timeout=120_000)
            page.screenshot(path=str(shots / "1-launcher.png"))
            launch.click()
            row = page.locator(".sandboxnb-row").first
            expect(row).to_contain_text("sb1", timeout=90_000)
            expect(row).to_contain_text("running", timeout=90_000)
            expect(row).to_contain_text("local")
            page.screenshot(path=str(shots / "2-running.png"))
            servers = alive(sandbox_server_pids()) & descendants(server.pid)
            assert len(servers) >= 1, "no sandbox server runs under the kernel"

            row.locator(".sandboxnb-stop").click()
            expect(page.locator(".sandboxnb-row")).to_have_count(0, timeout=90_000)
            page.screenshot(path=str(shots / "3-stopped.png"))
            wait_until(lambda: not alive(servers), 10,
                       "the stopped sandbox's server to exit", interval=0.1)
            _wait_kernels_idle(base)  # the notebook's remaining cells (a run) finish cleanly
        except BaseException:
            with contextlib.suppress(Exception):
                page.screenshot(path=str(shots / "failure.png"), full_page=True)
                keep = ROOT / "test-output" / "browser"
                keep.mkdir(parents=True, exist_ok=True)
                shutil.copy(shots / "failure.png", keep / "failure.png")
            raise
        finally:
            context.close()


# ---- the launcher as a new user meets it --------------------------------------------------------
LAUNCHER_NOTEBOOK = {
    "cells": [
        {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
         "source": "import sandboxnb\n%load_ext sandboxnb"},
        {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
         "source": "sandboxnb.launcher(provider=\"local\")"},
        {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
         "source": ""},
    ],
    "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python",
                                "name": "python3"}},
    "nbformat": 4, "nbformat_minor": 5,
}


def test_launcher_adapts_to_the_provider_and_publishes_the_sandbox(jupyterlab, tmp_path):
    """Fields local does not honour are disabled with the reason (and enabled for a provider
    that honours them); Launch puts the sandbox in the notebook under its name, says how to use
    it, and the table has headers and ages that move; screenshots in the light and dark theme
    go to artifacts/screenshots/."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: run `sudo scripts/setup-browser`")
    from playwright.sync_api import expect, sync_playwright

    base, _server = jupyterlab
    work = tmp_path / "work"  # what the fixture serves
    (work / "launcher.ipynb").write_text(json.dumps(LAUNCHER_NOTEBOOK))
    shots = ROOT / "artifacts" / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    _set_subreaper(True)
    try:
        with sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile-launcher"), executable_path=CHROMIUM,
                headless=True, args=CHROMIUM_FLAGS, viewport={"width": 1400, "height": 1000})
            try:
                page = context.new_page()
                page.set_default_timeout(60_000)
                _open_and_run_all(page, base, "launcher.ipynb")
                launcher = page.locator(".sandboxnb-launcher").first
                launcher.wait_for(timeout=120_000)
                disk = page.locator(".sandboxnb-field-disk_mb")
                expect(disk.locator("input")).to_be_disabled()
                expect(disk).to_contain_text("local does not support resources.disk_mb")
                expect(page.locator(".sandboxnb-field-gpu input")).to_be_disabled()
                expect(page.locator(".sandboxnb-field-memory_mb input")).to_be_enabled()
                _choose(launcher.locator("select").first, "modal")
                expect(page.locator(".sandboxnb-field-gpu input")).to_be_enabled()
                expect(page.locator(".sandboxnb-field-image input")).to_be_enabled()
                expect(disk.locator("input")).to_be_disabled()
                _choose(launcher.locator("select").first, "local")
                expect(page.locator(".sandboxnb-field-gpu input")).to_be_disabled()
                launcher.locator("input").first.fill("box")  # the name field
                page.locator(".sandboxnb-launch").first.click()
                status = page.locator(".sandboxnb-status").first
                expect(status).to_contain_text('await box.exec("ls")', timeout=90_000)
                expect(status).to_contain_text("%%sandbox box")
                expect(page.locator(".sandboxnb-header")).to_contain_text("age")
                row = page.locator(".sandboxnb-row-box")
                expect(row).to_contain_text("running")
                first = row.inner_text()  # only the age changes in a running row
                wait_until(lambda: row.inner_text() != first, 30,
                           f"the age to move on by itself (row: {first!r})", interval=0.2)
                launcher.screenshot(path=str(shots / "launcher-light.png"))
                # the sandbox is in the namespace under its name
                cell = page.locator(".jp-Cell").nth(2)  # the empty third cell
                cell.locator(".cm-content").click()
                page.keyboard.type("print((await box.exec('echo from-box')).stdout)")
                page.keyboard.press("Shift+Enter")
                expect(cell.locator(".jp-OutputArea")).to_contain_text("from-box",
                                                                        timeout=60_000)
                _dark_theme(page)
                launcher.screenshot(path=str(shots / "launcher-dark.png"))
                row.locator(".sandboxnb-stop").click()
                expect(page.locator(".sandboxnb-row")).to_have_count(0, timeout=90_000)
            finally:
                context.close()
    finally:
        _reap_browser_children()
        _set_subreaper(False)
    assert {"launcher-light.png", "launcher-dark.png"} <= {p.name for p in shots.iterdir()}


def _open_and_run_all(page, base: str, notebook: str) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for attempt in range(3):  # a loaded machine can fail the first fetch
        page.goto(f"{base}/lab/tree/{notebook}")
        try:
            page.locator(".jp-Notebook").first.wait_for(timeout=60_000)
            break
        except PlaywrightTimeout:
            if attempt == 2:
                raise
    with contextlib.suppress(PlaywrightTimeout):  # "Select Kernel" shows on first open
        page.locator(".jp-Dialog button", has_text="Select").first.click(timeout=15_000)
    page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").first.wait_for(
        timeout=90_000)
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()


def _choose(select, provider: str) -> None:
    """Pick ``provider`` in the dropdown (labelled ``modal (unavailable)`` where it is)."""
    labels = select.locator("option").all_text_contents()
    (label,) = [t for t in labels if t.replace("\xa0", " ").split(" ")[0] == provider]
    select.select_option(label=label)


def _dark_theme(page) -> None:
    page.locator(".lm-MenuBar-itemLabel", has_text="Settings").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Theme").first.hover()
    page.locator(".lm-Menu-itemLabel", has_text="JupyterLab Dark").first.click()
    page.wait_for_function(
        "document.body.dataset.jpThemeLight === 'false'", timeout=30_000)
    page.locator("#jupyterlab-splash").wait_for(state="detached", timeout=30_000)


# ---- Cancel and Kernel > Interrupt during a blocking `%sandbox run` ------------------------------

_CONTROL_CELLS = [
    # 0: an agent whose rollouts wait 600 s, except HumanEval/0 which answers at once
    "import asyncio\n%load_ext sandboxnb\nfrom sandboxnb.agents import oracle\n"
    "async def slow(sandbox, task):\n"
    "    with open({marks!r}, 'a') as marks:\n"
    "        marks.write(task.id + ' ')\n"
    "    if task.id != 'HumanEval/0':\n"
    "        await asyncio.sleep(600)\n"
    "    return await oracle(sandbox, task)",
    # 1: a run that would take 20 x 600 s
    "%sandbox run humaneval --agent slow --limit 40 --max-concurrent 2 -o df "
    "--journal {j1}",
    # 2
    "print('DF', _sandbox_run.status, len(df), sorted(map(str, df['status'])))",
    # 3: the same, to be interrupted from the Kernel menu
    "%sandbox run humaneval --agent slow --limit 40 --max-concurrent 2 -o df2 "
    "--journal {j2}",
    # 4: run by hand after the interrupt (Run All stops at the interrupted cell)
    "print('DF2', _sandbox_run.status, len(df2), sorted(map(str, df2['status'])))",
]


def _control_notebook(path: Path, **paths: str) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src.format(**paths)) for src in _CONTROL_CELLS]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nbformat.write(nb, path)


def _open_notebook(page, url: str, PlaywrightTimeout) -> None:
    """Open a notebook and wait for its kernel; a loaded machine can fail a fetch ("File Load
    Error"), so a failed opening is dismissed and tried again."""
    for attempt in range(3):
        page.goto(url)
        try:
            page.locator(".jp-Notebook").first.wait_for(timeout=60_000)
            with contextlib.suppress(PlaywrightTimeout):  # "Select Kernel" on first open
                page.locator(".jp-Dialog button", has_text="Select").first.click(
                    timeout=15_000)
            page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").first.wait_for(
                timeout=90_000)
            return
        except PlaywrightTimeout:
            if attempt == 2:
                raise


def _menu(page, menu: str, item: str) -> None:
    page.locator(".lm-MenuBar-itemLabel", has_text=menu).first.click()
    page.locator(".lm-Menu-itemLabel", has_text=item).first.click()


def test_cancel_and_interrupt_a_blocking_run_from_jupyterlab(jupyterlab, tmp_path):
    """Cancel, clicked while `%sandbox run` blocks the cell, ends the run within seconds (the run
    would take > 3 hours) and df holds the rows so far; so does Kernel > Interrupt. The monitor
    shows one final state. Screenshots go to artifacts/screenshots/."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: run `sudo scripts/setup-browser`")
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import expect, sync_playwright

    base, server = jupyterlab
    j1, j2 = tmp_path / "cancelled.jsonl", tmp_path / "interrupted.jsonl"
    marks = tmp_path / "marks"  # the agent notes each rollout it starts
    _control_notebook(tmp_path / "work" / "control.ipynb", j1=str(j1), j2=str(j2),
                      marks=str(marks))
    keep = ROOT / "artifacts" / "screenshots"
    keep.mkdir(parents=True, exist_ok=True)
    _set_subreaper(True)
    try:
        with sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True,
                args=CHROMIUM_FLAGS, viewport={"width": 1400, "height": 1400},
            )
            page = context.new_page()
            page.set_default_timeout(60_000)
            try:
                timings = _cancel_then_interrupt(page, base, keep, marks, expect,
                                                 PlaywrightTimeout)
            except BaseException:
                with contextlib.suppress(Exception):
                    page.screenshot(path=str(keep / "control-failure.png"), full_page=True)
                raise
            finally:
                context.close()
    finally:
        _reap_browser_children()
        _set_subreaper(False)
    print(f"click -> final state {timings['cancel']:.2f}s; interrupt -> one line "
          f"{timings['interrupt']:.2f}s")
    assert not alive(sandbox_server_pids()) & descendants(server.pid)


def _started(marks: Path, count: int) -> None:
    wait_until(lambda: marks.exists() and len(marks.read_text().split()) >= count, 60,
               f"{count} rollouts to reach the agent")


def _cancel_then_interrupt(page, base, keep, marks, expect,
                           PlaywrightTimeout) -> dict[str, float]:
    timings: dict[str, float] = {}
    _open_notebook(page, f"{base}/lab/tree/control.ipynb", PlaywrightTimeout)
    _menu(page, "Run", "Run All Cells")
    cells = page.locator(".jp-Notebook .jp-CodeCell")

    # 1) Cancel from the monitor while the cell blocks
    monitor = cells.nth(1).locator(".sandboxnb-monitor")
    expect(monitor).to_contain_text("1/40", timeout=120_000)  # >= 1 row done: the run is on
    expect(cells.nth(1)).to_contain_text("journal: ")  # printed when the run starts
    _started(marks, 3)  # HumanEval/0 done, 1 and 2 in flight
    began = time.monotonic()
    monitor.locator(".sandboxnb-cancel").click()
    expect(monitor).to_contain_text("status: cancelled", timeout=30_000)
    timings["cancel"] = time.monotonic() - began
    assert timings["cancel"] < 5, f"Cancel took {timings['cancel']:.1f}s (the run takes hours)"
    expect(monitor).not_to_contain_text("cancelling")
    expect(monitor.locator(".sandboxnb-cancel")).to_be_disabled()
    expect(cells.nth(1)).to_contain_text("cancelled: 1/40 rollouts finished (2 cancelled)")
    monitor.screenshot(path=str(keep / "control-1-cancelled-monitor.png"))
    # the next cell reads df back: the rows so far
    expect(cells.nth(2)).to_contain_text(
        "DF cancelled 3 ['cancelled', 'cancelled', 'ok']", timeout=60_000)

    # 2) Kernel > Interrupt during the next run
    monitor2 = cells.nth(3).locator(".sandboxnb-monitor")
    expect(monitor2).to_contain_text("1/40", timeout=120_000)
    _started(marks, 6)
    began = time.monotonic()
    _menu(page, "Kernel", "Interrupt Kernel")
    expect(cells.nth(3)).to_contain_text("interrupted: 1/40 rollouts finished (2 cancelled); "
                                         "3 rows in df2", timeout=30_000)
    timings["interrupt"] = time.monotonic() - began
    assert timings["interrupt"] < 10, f"interrupt took {timings['interrupt']:.1f}s"
    expect(cells.nth(3)).to_contain_text("--resume` runs the other 39")
    expect(cells.nth(3)).not_to_contain_text("Traceback")
    expect(monitor2).to_contain_text("status: cancelled")
    cells.nth(3).screenshot(path=str(keep / "control-2-interrupted-cell.png"))
    _wait_kernels_idle(base, timeout=60, stable_s=1)
    cells.nth(4).click()
    page.keyboard.press("Shift+Enter")
    expect(cells.nth(4)).to_contain_text(
        "DF2 cancelled 3 ['cancelled', 'cancelled', 'ok']", timeout=60_000)
    page.screenshot(path=str(keep / "control-3-notebook.png"), full_page=True)
    return timings
