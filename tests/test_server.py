"""The sandbox server through real processes and raw sockets (no client library)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import sandboxnb.server
from sandboxnb.bundle import bundle_path
from sandboxnb.server import wire as P

from .helpers import alive, wait_until, written

TOKEN = "s3cret-token"


class Server:
    def __init__(self, tmp_path: Path, *args: str, token: str | None = TOKEN) -> None:
        env = {k: v for k, v in os.environ.items() if k != "SANDBOXNB_TOKEN"}
        if token is not None:
            env["SANDBOXNB_TOKEN"] = token
        self.workdir = tmp_path / "work"
        self.proc = subprocess.Popen(
            [sys.executable, "-S", "-E", "-s", str(bundle_path()), "--workdir", str(self.workdir),
             *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True,
        )
        line = self.proc.stdout.readline().decode()
        self.ready = json.loads(line.split(" ", 1)[1]) if line.startswith("SANDBOXNB_READY") else {}

    @property
    def port(self) -> int:
        return self.ready["port"]

    def client(self, auth: bool = True) -> Conn:
        conn = Conn(socket.create_connection(("127.0.0.1", self.port), timeout=10))
        if auth:
            assert "result" in conn.call("auth", token=TOKEN, protocol=1)
        return conn

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc.stdout.close()
        self.proc.stderr.close()


class Conn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.file = sock.makefile("rwb")
        self.ids = iter(range(1, 10**6))
        self.notes: list[dict] = []

    def send(self, method: str, **params) -> int:
        req_id = next(self.ids)
        self.raw(P.encode(P.request(req_id, method, params)))
        return req_id

    def raw(self, data: bytes) -> None:
        self.file.write(data)
        self.file.flush()

    def recv(self) -> dict | None:
        line = self.file.readline()
        return json.loads(line) if line else None

    def wait(self, req_id: int) -> dict:
        while True:
            message = self.recv()
            assert message is not None, "connection closed"
            if message.get("id") == req_id and "method" not in message:
                return message
            self.notes.append(message)

    def call(self, method: str, **params) -> dict:
        return self.wait(self.send(method, **params))

    def output(self, stream: str = "stdout") -> str:
        return "".join(n["params"]["data"] for n in self.notes if n["params"]["stream"] == stream)

    def closed(self) -> bool:
        return self.file.readline() == b""

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path)
    yield srv
    srv.stop()


def _wait_dead(pids: list[int]) -> None:
    wait_until(lambda: not alive(pids), 5, f"processes {pids} to end")


def test_ready_line(server):
    assert server.ready == {"port": server.port, "pid": server.proc.pid, "protocol": 1}


def test_token_is_required_in_env(tmp_path):
    srv = Server(tmp_path, token=None)
    try:
        assert srv.proc.wait(10) == 2 and not srv.ready
        assert b"SANDBOXNB_TOKEN" in srv.proc.stderr.read()
    finally:
        srv.stop()


@pytest.mark.parametrize("first", [
    {"method": "ping", "params": {}},
    {"method": "auth", "params": {"protocol": 1}},
    {"method": "auth", "params": {"token": "wrong", "protocol": 1}},
    {"method": "auth", "params": {"token": TOKEN, "protocol": 99}},
])
def test_handshake_refusals_close_the_connection(server, first):
    conn = server.client(auth=False)
    reply = conn.call(first["method"], **first["params"])
    assert reply["error"]["code"] in (P.AUTH_REQUIRED, P.AUTH_FAILED, P.PROTOCOL_MISMATCH)
    assert conn.closed()
    good = server.client()  # the server still serves others
    assert "result" in good.call("ping")


def test_garbage_before_auth_is_refused(server):
    conn = server.client(auth=False)
    conn.raw(b"GET / HTTP/1.1\r\n\r\n")
    assert conn.recv()["error"]["code"] == P.PARSE_ERROR
    assert conn.closed()
    assert "result" in server.client().call("ping")


def test_malformed_frames_after_auth_are_answered(server):
    conn = server.client()
    conn.raw(b"{nope\n")
    assert conn.recv()["error"]["code"] == P.PARSE_ERROR
    conn.raw(b'{"jsonrpc": "2.0", "id": 5, "method": "frobnicate"}\n')
    assert conn.recv()["error"]["code"] == P.METHOD_NOT_FOUND
    assert conn.call("exec", cmd=42)["error"]["code"] == P.INVALID_PARAMS
    assert "result" in conn.call("ping")


def test_oversized_frame_closes_only_that_connection(tmp_path):
    srv = Server(tmp_path, "--max-frame-bytes", "4096")
    try:
        bystander = srv.client()
        conn = srv.client()
        conn.raw(b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":"' + b"x" * 20000)
        reply = conn.recv()
        assert reply["error"]["code"] == P.FRAME_TOO_LARGE
        assert conn.closed()
        assert "result" in bystander.call("ping")
        assert "result" in srv.client().call("ping")
    finally:
        srv.stop()


def test_exec_streams_before_exit(server):
    conn = server.client()
    start = time.monotonic()
    req = conn.send("exec", cmd="echo first; echo oops >&2; sleep 1; echo second")
    first = conn.recv()
    first_at = time.monotonic() - start
    assert first["method"] == "output" and first["params"]["id"] == req
    reply = conn.wait(req)
    assert first_at < 0.8 <= time.monotonic() - start
    conn.notes.insert(0, first)
    assert conn.output() == "first\nsecond\n" and conn.output("stderr") == "oops\n"
    assert reply["result"]["exit_code"] == 0 and reply["result"]["timed_out"] is False


def test_exec_argv_cwd_env_stdin_and_token_hidden(server):
    conn = server.client()
    (server.workdir / "sub").mkdir()
    script = "pwd; echo $FOO; cat; env | grep -c SANDBOXNB_TOKEN || true"
    reply = conn.call("exec", cmd=["sh", "-c", script],
                      cwd="sub", env={"FOO": "bar"}, stdin="from stdin\n")
    assert reply["result"]["exit_code"] == 0
    assert conn.output() == f"{server.workdir / 'sub'}\nbar\nfrom stdin\n0\n"
    assert conn.call("exec", cmd=["/no/such/binary"])["result"]["exit_code"] == 127
    assert conn.call("exec", cmd="exit 3")["result"]["exit_code"] == 3
    assert conn.call("exec", cmd="true", cwd="/no/such/dir")["error"]["code"] == P.INVALID_PARAMS


def test_exec_timeout_kills_grandchildren(server):
    conn = server.client()
    script = "sleep 300 & echo $! > pids; sh -c 'sleep 301 & echo $! >> pids; wait' & wait"
    start = time.monotonic()
    reply = conn.call("exec", cmd=script, timeout=0.5)
    assert reply["result"]["timed_out"] is True
    assert time.monotonic() - start < 3
    pids = [int(p) for p in (server.workdir / "pids").read_text().split()]
    assert len(pids) == 2
    _wait_dead(pids)


def test_cancel_and_disconnect_kill_the_process_group(server):
    conn = server.client()
    req = conn.send("exec", cmd="sleep 300 & echo $! > pid1; wait")
    pidfile = server.workdir / "pid1"
    wait_until(lambda: written(pidfile), 5, "pid1", interval=0.02)
    assert conn.call("cancel", id=req)["result"] == {"cancelled": True}
    assert conn.wait(req)["error"]["code"] == P.CANCELLED
    _wait_dead([int(pidfile.read_text())])

    conn.send("exec", cmd="sleep 300 & echo $! > pid2; wait")
    pidfile = server.workdir / "pid2"
    wait_until(lambda: written(pidfile), 5, "pid2", interval=0.02)
    conn.close()
    _wait_dead([int(pidfile.read_text())])


def test_files_round_trip_and_limits(tmp_path):
    srv = Server(tmp_path, "--max-file-bytes", "1000")
    try:
        conn = srv.client()
        import base64

        payload = bytes(range(256)) * 3
        reply = conn.call("write_file", path="deep/dir/f.bin",
                          data=base64.b64encode(payload).decode(), mode=0o600)
        assert reply["result"]["size"] == len(payload)
        target = srv.workdir / "deep/dir/f.bin"
        assert target.read_bytes() == payload and target.stat().st_mode & 0o777 == 0o600
        got = conn.call("read_file", path=str(target))["result"]
        assert base64.b64decode(got["data"]) == payload
        big = conn.call("write_file", path="big", data=base64.b64encode(b"x" * 1001).decode())
        assert big["error"]["code"] == P.FILE_TOO_LARGE and "1000" in big["error"]["message"]
        (srv.workdir / "big").write_bytes(b"y" * 5000)
        big = conn.call("read_file", path="big")
        assert big["error"]["code"] == P.FILE_TOO_LARGE and "5000" in big["error"]["message"]
        missing = conn.call("read_file", path="nope")["error"]
        assert missing["code"] == P.FILE_ERROR and missing["data"]["errno"] == 2
        assert conn.call("write_file", path="x", data="!!")["error"]["code"] == P.INVALID_PARAMS
    finally:
        srv.stop()


def test_python_namespace_persists_with_tracebacks_and_values(server):
    conn = server.client()
    first = conn.call("python", code="import os\nx = 20\nprint('hi', flush=True)\nx * 2")
    assert first["result"] == {"value": "40", "error": None} and conn.output() == "hi\n"
    assert conn.call("python", code="x + 1")["result"]["value"] == "21"
    assert conn.call("python", code="y = 1")["result"]["value"] is None
    err = conn.call("python", code="def f():\n    return 1 / 0\nf()")["result"]["error"]
    assert err["type"] == "ZeroDivisionError"
    assert "return 1 / 0" in err["traceback"] and "<sandbox-" in err["traceback"]
    assert "WORKER" not in err["traceback"] and "line 25" not in err["traceback"]
    syntax = conn.call("python", code="def (:")["result"]["error"]
    assert syntax["type"] == "SyntaxError"


def test_python_worker_is_a_real_module(server):
    """An error raised in the worker's own code (here: repr of the result) is reported with the
    worker's real file inside the bundle, its real line number and that line's source."""
    worker_file = Path(sandboxnb.server.__file__).with_name("pyworker.py")
    lines = worker_file.read_text().splitlines()
    line = next(n for n, text in enumerate(lines, 1) if text.strip() == "return repr(value)")
    conn = server.client()
    code = "class Unprintable:\n    __repr__ = None\nUnprintable()"
    err = conn.call("python", code=code)["result"]["error"]
    assert err["type"] == "TypeError"
    where = f'File "{bundle_path()}/sandboxnb/server/pyworker.py", line {line}, in run\n'
    assert where + "    return repr(value)\n" in err["traceback"]


def test_python_output_streams_while_running(server):
    conn = server.client()
    start = time.monotonic()
    req = conn.send("python", code="import time\nprint('a', flush=True)\ntime.sleep(1)\n'done'")
    first = conn.recv()
    assert first["method"] == "output" and time.monotonic() - start < 0.9
    assert conn.wait(req)["result"]["value"] == "'done'"


def test_python_timeout_interrupts_and_keeps_namespace(server):
    conn = server.client()
    conn.call("python", code="keep = 'me'\nimport os\npid = os.getpid()")
    worker = int(conn.call("python", code="pid")["result"]["value"])
    start = time.monotonic()
    reply = conn.call("python", code="import time\ntime.sleep(1000)", timeout=0.3)
    assert time.monotonic() - start < 3
    assert reply["error"]["code"] == P.TIMEOUT
    assert reply["error"]["data"]["namespace_reset"] is False
    assert reply["error"]["data"]["error"]["type"] == "KeyboardInterrupt"
    assert conn.call("python", code="keep")["result"]["value"] == "'me'"
    conn.call("shutdown")
    assert server.proc.wait(5) == 0
    _wait_dead([worker])


def test_python_that_ignores_sigint_is_killed_and_reset(server):
    conn = server.client()
    conn.call("python", code="import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)")
    reply = conn.call("python", code="time.sleep(1000)", timeout=0.2, interrupt_grace_s=0.3)
    assert reply["error"]["code"] == P.TIMEOUT
    assert reply["error"]["data"]["namespace_reset"] is True
    fresh = conn.call("python", code="'time' in dir()")["result"]["value"]
    assert fresh == "False"


def test_python_cancel(server):
    conn = server.client()
    req = conn.send("python", code="import time\nprint('go', flush=True)\ntime.sleep(1000)")
    assert conn.recv()["method"] == "output"
    conn.send("cancel", id=req)
    reply = conn.wait(req)
    assert reply["error"]["code"] == P.CANCELLED


def test_concurrent_connections(server):
    a, b = server.client(), server.client()
    req = a.send("exec", cmd="sleep 0.5; echo a")
    assert "result" in b.call("ping")
    assert a.wait(req)["result"]["exit_code"] == 0


def test_dead_man_switch_when_nobody_connects(tmp_path):
    srv = Server(tmp_path, "--startup-timeout", "0.5")
    try:
        start = time.monotonic()
        assert srv.proc.wait(5) == 0
        assert 0.4 < time.monotonic() - start < 3
    finally:
        srv.stop()


def test_dead_man_switch_when_idle_kills_children(tmp_path):
    srv = Server(tmp_path, "--idle-timeout", "0.5")
    try:
        conn = srv.client()
        conn.call("exec", cmd="(sleep 300 & echo $! > bg)")  # leaves a background process
        conn.call("python", code="import os\npid = os.getpid()")
        worker = int(conn.call("python", code="pid")["result"]["value"])
        background = int((srv.workdir / "bg").read_text())
        conn.close()
        assert srv.proc.wait(5) == 0
        _wait_dead([background, worker])
    finally:
        srv.stop()


def test_memory_limit_applies_to_children(tmp_path):
    srv = Server(tmp_path, "--memory-mb", "256")
    try:
        conn = srv.client()
        reply = conn.call("exec", cmd=[sys.executable, "-c", "b = bytearray(512 * 1024 * 1024)"])
        assert reply["result"]["exit_code"] != 0 and "MemoryError" in conn.output("stderr")
        assert conn.call("exec", cmd="true")["result"]["exit_code"] == 0
    finally:
        srv.stop()


def test_unix_socket(tmp_path):
    sock_path = tmp_path / "s.sock"
    srv = Server(tmp_path, "--unix", str(sock_path))
    try:
        assert srv.ready["port"] is None
        raw = socket.socket(socket.AF_UNIX)
        raw.connect(str(sock_path))
        conn = Conn(raw)
        assert "result" in conn.call("auth", token=TOKEN, protocol=1)
        assert "result" in conn.call("ping")
        conn.call("shutdown")
        assert srv.proc.wait(5) == 0 and not sock_path.exists()
    finally:
        srv.stop()


def test_listen_fd_serves_an_inherited_socket(tmp_path):
    """``--listen-fd``: the launcher listens; a client may connect before the server starts."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    early = Conn(socket.create_connection(("127.0.0.1", port), timeout=10))  # queued in backlog
    env = dict(os.environ, SANDBOXNB_TOKEN=TOKEN)
    proc = subprocess.Popen(
        [sys.executable, "-S", "-E", "-s", str(bundle_path()), "--workdir", str(tmp_path),
         "--listen-fd", str(listener.fileno())],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, pass_fds=[listener.fileno()],
    )
    listener.close()
    try:
        assert "result" in early.call("auth", token=TOKEN, protocol=1)
        assert early.call("exec", cmd="echo inherited")["result"]["exit_code"] == 0
        assert early.output() == "inherited\n"
        ready = json.loads(proc.stdout.readline().decode().split(" ", 1)[1])
        assert ready == {"port": port, "pid": proc.pid, "protocol": 1}
        early.call("shutdown")
        assert proc.wait(5) == 0
    finally:
        early.close()
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_non_regular_files_are_refused_at_once(server):
    """A FIFO (with or without a peer), a socket, a device or a directory is refused with a
    file error naming what it is; nothing blocks, and the connection keeps answering."""
    work = server.workdir
    os.mkfifo(work / "fifo")
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(work / "sock"))
    (work / "dir").mkdir()
    conn = server.client()
    import base64

    data = base64.b64encode(b"x").decode()
    try:
        for method, path, kind in (
                ("read_file", "fifo", "FIFO"), ("write_file", "fifo", "FIFO"),
                ("read_file", "sock", "socket"), ("write_file", "sock", "socket"),
                ("read_file", "/dev/zero", "character device"),
                ("write_file", "/dev/null", "character device"), ("read_file", "dir", "directory")):
            params = {"path": path, "data": data} if method == "write_file" else {"path": path}
            error = conn.call(method, **params)["error"]
            assert error["code"] == P.FILE_ERROR, (method, path, error)
            assert "not a regular file" in error["message"] and kind in error["message"], error
        # a FIFO that has a reader (write) or a writer (read) is refused too, not used
        peer = os.open(work / "fifo", os.O_RDONLY | os.O_NONBLOCK)
        writer = os.open(work / "fifo", os.O_WRONLY | os.O_NONBLOCK)
        try:
            for method in ("read_file", "write_file"):
                params = {"path": "fifo", "data": data} if method == "write_file" else {
                    "path": "fifo"}
                assert conn.call(method, **params)["error"]["code"] == P.FILE_ERROR
            with pytest.raises(BlockingIOError):
                os.read(peer, 10)  # nothing was written into the FIFO
        finally:
            os.close(writer)
            os.close(peer)
        assert "result" in conn.call("ping")
        assert (work / "fifo").is_fifo()
    finally:
        unix.close()
        conn.close()


def test_bad_params_answer_invalid_params_naming_the_field(server):
    conn = server.client()
    cases = [
        ("exec", {"cmd": ["echo", "a\0b"]}, "cmd"),
        ("exec", {"cmd": "echo a\0b"}, "cmd"),
        ("exec", {"cmd": "true", "cwd": "a\0b"}, "cwd"),
        ("exec", {"cmd": "true", "env": {"X": "a\0b"}}, "env"),
        ("exec", {"cmd": "true", "env": {"X\0": "b"}}, "env"),
        ("exec", {"cmd": "true", "env": {"": "x"}}, "env"),
        ("exec", {"cmd": "true", "env": {"A=B": "x"}}, "env"),
        ("exec", {"cmd": "true", "stdin": "\ud800"}, "stdin"),
        ("exec", {"cmd": "true", "stdin_b64": "!!"}, "stdin_b64"),
        ("exec", {"cmd": "true", "stdin": "a", "stdin_b64": "YQ=="}, "stdin"),
        ("exec", {"cmd": ["echo", "\ud800"]}, "cmd"),
        ("write_file", {"path": "f", "mode": 2**40}, "mode"),
        ("write_file", {"path": "f", "mode": -1}, "mode"),
        ("write_file", {"path": "f", "mode": 0o7777}, "mode"),
        ("write_file", {"path": "f", "mode": 0o4755}, "mode"),
        ("write_file", {"path": "a\0b"}, "path"),
        ("read_file", {"path": "\ud800"}, "path"),
        ("read_file", {"path": "a\0b"}, "path"),
        ("cancel", {"id": [1]}, "id"),
        ("cancel", {"id": {"a": 1}}, "id"),
    ]
    try:
        for method, params, name in cases:
            error = conn.call(method, **params)["error"]
            assert error["code"] == P.INVALID_PARAMS, (method, params, error)
            assert name in error["message"], (method, params, error)
        assert not (server.workdir / "f").exists()
        assert "result" in conn.call("ping")
    finally:
        conn.close()


def test_exec_binary_stdin(server):
    import base64

    payload = bytes(range(256)) * 4
    conn = server.client()
    try:
        reply = conn.call("exec", cmd=["sh", "-c", "cat > got.bin"],
                          stdin_b64=base64.b64encode(payload).decode())
        assert reply["result"]["exit_code"] == 0
        assert (server.workdir / "got.bin").read_bytes() == payload
    finally:
        conn.close()


def test_python_values_and_errors_over_the_frame_limit_are_cut(tmp_path):
    """A value (or an error) whose frame would exceed the limit comes back cut, with a marker
    saying how much was cut; the call succeeds and the connection stays in step."""
    limit = 200_000
    srv = Server(tmp_path, "--max-frame-bytes", str(limit))
    try:
        conn = srv.client()
        for code, kept in (("'x' * 1_000_000", "x"), ("'\\U0001F600' * 1_000_000", "\U0001F600"),
                           ("'\\u00e9\\n' * 600_000", "\u00e9\\n")):
            reply = conn.call("python", code=code)
            assert "result" in reply, reply.get("error")
            value = reply["result"]["value"]
            assert value.startswith("'" + kept * 100) and "characters of the value cut" in value
            assert len(json.dumps(reply)) < limit
        reply = conn.call("python", code="raise ValueError('y' * 1_000_000)")
        error = reply["result"]["error"]
        assert error["type"] == "ValueError" and error["message"].startswith("y" * 1000)
        assert "cut" in error["message"] and "cut" in error["traceback"]
        assert len(json.dumps(reply)) < limit
        assert conn.call("python", code="21 * 2")["result"]["value"] == "42"
        # user code can write to the worker's control pipe: a forged oversized reply is refused
        # with an error for that request, and the connection stays in step
        forged = ("import json, os, sys\n"
                  "reply = {'id': 1, 'value': 'z' * 1_000_000, 'error': None}\n"
                  "os.write(int(sys.argv[2]), (json.dumps(reply) + '\\n').encode())\n"
                  "os._exit(0)")
        reply = conn.call("python", code=forged)
        assert reply["error"]["code"] == P.FRAME_TOO_LARGE
        assert "result" in conn.call("ping")
        conn.close()
    finally:
        srv.stop()
