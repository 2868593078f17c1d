"""The async client against real server processes."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from sandboxnb.bundle import bundle_path
from sandboxnb.client import ExecResult, PythonResult, connect
from sandboxnb.errors import (
    AuthenticationError,
    ConfigError,
    ConnectionLost,
    RemoteError,
    RemotePythonError,
    SandboxTimeout,
)
from sandboxnb.server import wire as P

from .helpers import pid_alive, wait_until_async, written

TOKEN = "client-test-token"


@pytest.fixture
def server(tmp_path):
    """A real server; yields (url, workdir, proc)."""
    env = dict(os.environ, SANDBOXNB_TOKEN=TOKEN)
    work = tmp_path / "work"
    proc = subprocess.Popen(
        [sys.executable, "-S", "-E", "-s", str(bundle_path()), "--workdir", str(work)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, start_new_session=True,
    )
    ready = json.loads(proc.stdout.readline().split(b" ", 1)[1])
    yield f"tcp://127.0.0.1:{ready['port']}", work, proc
    try:
        os.killpg(proc.pid, signal.SIGCONT)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(5)
    except (OSError, subprocess.TimeoutExpired):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    proc.stdout.close()


async def test_exec_streams_through_callback(server):
    url, _, _ = server
    seen: list[tuple[float, str, str]] = []
    async with await connect(url, TOKEN) as sb:
        start = time.monotonic()
        result = await sb.exec("echo one; echo two >&2; sleep 0.6; echo three",
                               on_output=lambda s, d: seen.append((time.monotonic(), s, d)))
        end = time.monotonic()
    assert isinstance(result, ExecResult) and result.ok
    assert result.stdout == "one\nthree\n" and result.stderr == "two\n"
    assert seen[0][0] - start < 0.5 < end - start  # first chunk long before the end
    assert sb.closed


async def test_exec_options_and_results(server):
    url, work, _ = server
    async with await connect(url, TOKEN) as sb:
        r = await sb.exec(["sh", "-c", "cat; echo $X; pwd"], stdin=b"in\n", env={"X": "y"},
                          cwd=str(work))
        assert r.stdout == f"in\ny\n{work}\n"
        failed = await sb.exec("exit 4")
        assert failed.exit_code == 4 and not failed.ok
        slow = await sb.exec("sleep 30", timeout=0.2)
        assert slow.timed_out and not slow.ok and slow.duration_s < 5
        assert await sb.ping() < 1.0
        bad = sb.exec("true", cwd="/does/not/exist")
        with pytest.raises(RemoteError) as info:
            await bad
        assert info.value.code == P.INVALID_PARAMS


async def test_wrong_token_raises_authentication_error(server):
    url, _, _ = server
    with pytest.raises(AuthenticationError):
        await connect(url, "wrong")
    with pytest.raises(AuthenticationError):
        await connect(url, "")
    with pytest.raises(ValueError, match="unsupported scheme"):
        await connect("http://127.0.0.1:1", TOKEN)


async def test_cancelling_exec_kills_the_remote_process(server):
    url, work, _ = server
    async with await connect(url, TOKEN) as sb:
        task = asyncio.ensure_future(sb.exec("sleep 300 & echo $! > pid; wait"))
        pid = int(await wait_until_async(lambda: written(work / "pid"), 5, "the pid file",
                                         interval=0.02))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until_async(lambda: not pid_alive(pid), 5, f"remote process {pid} to end")
        assert (await sb.exec("echo still")).stdout == "still\n"


async def test_python_values_errors_and_timeouts(server):
    url, _, _ = server
    async with await connect(url, TOKEN) as sb:
        r = await sb.python("import os\nn = 6\nprint('out')\nn * 7")
        assert isinstance(r, PythonResult) and r.value == "42" and r.stdout == "out\n"
        assert (await sb.python("n")).value == "6"
        with pytest.raises(RemotePythonError) as info:
            await sb.python("def boom():\n    raise KeyError('k')\nboom()")
        assert info.value.type == "KeyError" and "raise KeyError('k')" in info.value.traceback
        soft = await sb.python("1/0", check=False)
        assert soft.error["type"] == "ZeroDivisionError" and not soft.ok
        start = time.monotonic()
        with pytest.raises(SandboxTimeout) as timeout:
            await sb.python("import time\ntime.sleep(1000)", timeout=0.3)
        assert time.monotonic() - start < 3
        assert timeout.value.data["namespace_reset"] is False
        assert (await sb.python("n")).value == "6"


async def test_cancelling_python_interrupts_it(server):
    url, _, _ = server
    async with await connect(url, TOKEN) as sb:
        await sb.python("import os\nworker = os.getpid()\nstate = 'kept'")
        task = asyncio.ensure_future(sb.python("import time\ntime.sleep(1000)"))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (await sb.python("state")).value == "'kept'"


async def test_files(server):
    url, work, _ = server
    async with await connect(url, TOKEN) as sb:
        path = await sb.write_file("a/b/c.txt", "héllo", mode=0o640)
        assert path == str(work / "a/b/c.txt")
        assert await sb.read_file("a/b/c.txt") == "héllo".encode()
        blob = os.urandom(300_000)
        await sb.write_file("blob", blob)
        assert await sb.read_file(str(work / "blob")) == blob
        with pytest.raises(RemoteError) as info:
            await sb.read_file("missing")
        assert info.value.code == P.FILE_ERROR
        with pytest.raises(RemoteError) as info:
            await sb.write_file("huge", b"x" * (P.MAX_FILE_BYTES + 1))
        assert info.value.code == P.FILE_TOO_LARGE and "limit" in info.value.message


@pytest.mark.parametrize("how", [signal.SIGSTOP, signal.SIGKILL])
async def test_dead_server_raises_connection_lost_promptly(server, how):
    url, work, proc = server
    sb = await connect(url, TOKEN, heartbeat_s=0.3)
    child = None
    try:
        pending = asyncio.ensure_future(sb.exec("echo $$ > pid; exec sleep 60"))
        child = int(await wait_until_async(lambda: written(work / "pid"), 5, "the pid file",
                                           interval=0.02))
        start = time.monotonic()
        os.kill(proc.pid, how)
        with pytest.raises(ConnectionLost):
            await asyncio.wait_for(pending, 10)
        assert time.monotonic() - start < 3
        assert sb.closed
        with pytest.raises(ConnectionLost):
            await sb.ping()
    finally:
        await sb.close()
        os.killpg(proc.pid, signal.SIGKILL)
        if child is not None:  # a SIGKILLed server cannot clean up its children
            os.killpg(child, signal.SIGKILL)


async def test_repr_never_shows_the_token(server):
    """Neither the plain repr nor the HTML the notebook layer registers for a Sandbox."""
    from sandboxnb.notebook.reprs import sandbox_html

    url, _, _ = server
    sb = await connect(url, TOKEN)
    try:
        text, html = repr(sb), sandbox_html(sb)
        assert "open" in text and url in text and TOKEN not in text + html
        assert "sandboxnb" in html and sb.info["python"] in html
    finally:
        await sb.close()
    assert "closed" in repr(sb)


async def test_shutdown_stops_the_server(server):
    url, _, proc = server
    sb = await connect(url, TOKEN)
    await sb.shutdown()
    assert sb.closed
    assert await asyncio.to_thread(proc.wait, 5) == 0


async def test_unix_socket_url(tmp_path):
    sock = tmp_path / "srv.sock"
    env = dict(os.environ, SANDBOXNB_TOKEN=TOKEN)
    proc = subprocess.Popen(  # noqa: ASYNC220 - the test owns this process
        [sys.executable, "-S", "-E", "-s", str(bundle_path()), "--unix", str(sock)],
        stdout=subprocess.PIPE, env=env, start_new_session=True,
    )
    try:
        assert proc.stdout.readline().startswith(b"SANDBOXNB_READY")
        async with await connect(f"unix://{sock}", TOKEN) as sb:
            assert (await sb.exec("echo unix")).stdout == "unix\n"
            await sb.shutdown()
        assert await asyncio.to_thread(proc.wait, 5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


async def test_failing_output_callback_keeps_the_connection(caplog):
    from sandboxnb.providers.local import LocalProvider

    def broken(stream, data):
        raise RuntimeError("callback bug")

    async with LocalProvider().sandbox() as ep, await connect(ep) as sb:
        result = await sb.exec("echo hello", on_output=broken)
        assert result.stdout == "hello\n"
        assert (await sb.exec("echo still")).stdout == "still\n"
    assert "callback bug" in caplog.text


@pytest.mark.parametrize("absurd", [math.inf, 1e300, math.nan, -1, 0, True, "5"])
async def test_an_absurd_timeout_is_refused_and_the_connection_stays_in_step(absurd):
    import sandboxnb
    from sandboxnb.errors import ConfigError, RemoteError

    async with sandboxnb.launch("local") as sb:
        with pytest.raises(ConfigError, match=r"timeout = .*expected seconds > 0"):
            await sb.exec("sleep 30", timeout=absurd)
        with pytest.raises(ConfigError, match="timeout = "):
            await sb.python("1 + 1", timeout=absurd)
        if isinstance(absurd, float):  # a client that skips the check meets the server's
            with pytest.raises(RemoteError, match="parameter timeout"):
                await sb._request("python", {"code": "41", "timeout": absurd}, None)
        assert (await sb.python("2 + 2")).value == "4"  # the next reply is its own
        assert (await sb.exec("echo ok")).stdout == "ok\n"


async def test_captured_output_is_bounded_and_the_callback_sees_everything():
    import sandboxnb

    seen = [0]
    async with sandboxnb.launch("local") as sb:
        sb.max_output_chars = 100_000
        result = await sb.exec(
            ["python3", "-c", "import sys; [sys.stdout.write('x' * 65536) for _ in range(160)]"],
            on_output=lambda stream, data: seen.__setitem__(0, seen[0] + len(data)))
        assert result.exit_code == 0 and seen[0] == 160 * 65536  # ~10 MB streamed
        kept, _, marker = result.stdout.partition("\n[...")
        assert kept == "x" * 100_000
        assert f"{160 * 65536 - 100_000} more characters of stdout cut" in marker
        small = await sb.exec("echo hi")  # below the cap: untouched
        assert small.stdout == "hi\n"


async def test_bad_arguments_are_refused_before_sending(server):
    """Each bad argument raises ConfigError naming the argument, what was given and what is
    accepted, before anything is sent; the connection stays in step."""
    url, work, _ = server
    async with await connect(url, TOKEN) as sb:
        cases = [
            (sb.exec(["echo", "a\0b"]), "cmd", "NUL"),
            (sb.exec("echo a\0b"), "cmd", "NUL"),
            (sb.exec([]), "cmd", "non-empty"),
            (sb.exec("true", cwd="a\0b"), "cwd", "NUL"),
            (sb.exec("true", cwd=5), "cwd", "str"),
            (sb.exec("true", env={"X": "a\0b"}), "env", "NUL"),
            (sb.exec("true", env={"X\0": "b"}), "env", "NUL"),
            (sb.exec("true", env={"": "x"}), "env", "non-empty"),
            (sb.exec("true", env={"A=B": "x"}), "env", "'='"),
            (sb.exec("true", env={"X": 5}), "env", "str"),
            (sb.exec("true", env=["X"]), "env", "dict"),
            (sb.exec("true", stdin="\ud800"), "stdin", "surrogate"),
            (sb.exec("true", stdin=5), "stdin", "bytes"),
            (sb.write_file("f", 5), "data", "bytes or str"),
            (sb.write_file("f", b"x", mode=2**40), "mode", "0o777"),
            (sb.write_file("f", b"x", mode=-1), "mode", "0o777"),
            (sb.write_file("f", b"x", mode=0o7777), "mode", "setuid"),
            (sb.write_file("f", b"x", mode=0o4755), "mode", "setuid"),
            (sb.write_file("f", b"x", mode=True), "mode", "0o777"),
            (sb.write_file("a\0b", b"x"), "path", "NUL"),
            (sb.read_file("\ud800"), "path", "surrogate"),
            (sb.read_file(5), "path", "str"),
            (sb.python(5), "code", "str"),
        ]
        for call, name, accepted in cases:
            with pytest.raises(ConfigError) as info:
                await call
            message = str(info.value)
            assert message.startswith(name) and accepted in message, message
        assert not (work / "f").exists()
        assert await sb.ping() < 5


async def test_binary_stdin_and_memoryview_data_round_trip(server):
    url, work, _ = server
    payload = bytes(range(256)) * 4
    async with await connect(url, TOKEN) as sb:
        r = await sb.exec(["sh", "-c", "cat > got.bin"], stdin=payload)
        assert r.ok and (work / "got.bin").read_bytes() == payload
        r = await sb.exec(["sh", "-c", "cat > got2.bin"], stdin=bytearray(b"\xff\x00"))
        assert r.ok and (work / "got2.bin").read_bytes() == b"\xff\x00"
        await sb.write_file("mv.bin", memoryview(payload), mode=0o640)
        assert (work / "mv.bin").read_bytes() == payload
        assert (work / "mv.bin").stat().st_mode & 0o7777 == 0o640
        assert await sb.read_file("mv.bin") == payload


async def test_fifo_is_refused_and_the_connection_stays_in_step(server):
    url, _, _ = server
    async with await connect(url, TOKEN, heartbeat_s=0.5) as sb:
        await sb.exec(["mkfifo", "pipe"])
        for call in (sb.read_file("pipe"), sb.write_file("pipe", b"x")):
            with pytest.raises(RemoteError) as info:
                await asyncio.wait_for(call, 30)
            assert info.value.code == P.FILE_ERROR and "FIFO" in info.value.message
        assert (await sb.exec("echo ok")).stdout == "ok\n"
