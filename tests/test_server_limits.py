"""Attacks on the sandbox server's limits, through a real server process and raw sockets.

Code inside a sandbox can reach the server's port. Without the token it must not be able to grow
the server's memory past a bound, hold a connection open past the handshake deadline, or keep an
authenticated client from connecting; with the token, an oversized frame is refused clearly.
"""

from __future__ import annotations

import asyncio
import select
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

from sandboxnb import client
from sandboxnb.server import wire as P
from sandboxnb.server.gate import MAX_PENDING

from .test_server import TOKEN, Server

pytestmark = pytest.mark.slow

MB = 1024 * 1024
#: How far the server's resident memory may grow under any of the attacks below.
RSS_GROWTH_BOUND = 64 * MB


def rss(server: Server) -> int:
    return psutil.Process(server.proc.pid).memory_info().rss


class PeakRss:
    """Samples the server's RSS on a thread while an attack runs; ``peak`` is the highest seen."""

    def __init__(self, server: Server) -> None:
        self.proc = psutil.Process(server.proc.pid)
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.NoSuchProcess:
                return

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path)
    yield srv
    srv.stop()


def _flood(port: int, total: int, chunk: bytes, done: list[str]) -> None:
    """Send ``total`` bytes without a newline, before any auth; record how it ended."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sent = 0
    try:
        while sent < total:
            sent += sock.send(chunk)
        done.append("sent everything")
    except OSError:
        done.append("dropped")
    finally:
        sock.close()


def test_unauthenticated_floods_do_not_grow_memory(server):
    """32 connections each sending 30 MB without a newline: the server drops each one after a
    few KB, and its memory stays within the bound (it grew by ~1 GB when it buffered them)."""
    before = rss(server)
    done: list[str] = []
    chunk = b"x" * (256 * 1024)
    threads = [threading.Thread(target=_flood, args=(server.port, 30 * MB, chunk, done))
               for _ in range(32)]
    with PeakRss(server) as peak:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    growth = peak.peak - before
    assert growth < RSS_GROWTH_BOUND, f"server RSS grew by {growth / MB:.1f} MB"
    assert done == ["dropped"] * 32
    conn = server.client()
    assert "result" in conn.call("ping")
    conn.close()


def test_an_oversized_auth_frame_is_refused_with_an_error(server):
    conn = server.client(auth=False)
    conn.raw(b'{"jsonrpc":"2.0","id":1,"method":"auth","params":{"token":"' + b"a" * 20000)
    reply = conn.recv()
    assert reply["error"]["code"] == P.FRAME_TOO_LARGE
    assert "before authentication" in reply["error"]["message"]
    assert conn.closed()
    conn.close()


def _drip(port: int, every: float) -> tuple[float, bytes]:
    """Drip one byte of a never-ending auth frame every ``every`` s; return when the server
    dropped the connection (seconds after connect) and what it answered."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    start = time.monotonic()
    answer = b""
    try:
        frame = iter(b'{"jsonrpc":"2.0","id":1,"method":"auth","params":{"token":"' + b"a" * 100)
        while time.monotonic() - start < 30:
            try:
                sock.sendall(bytes([next(frame)]))
            except OSError:
                break
            readable, _, _ = select.select([sock], [], [], every)
            if readable:
                try:
                    data = sock.recv(65536)
                except OSError:
                    break
                if not data:
                    break
                answer += data
        return time.monotonic() - start, answer
    finally:
        sock.close()


def test_a_drip_is_dropped_at_the_whole_handshake_deadline(tmp_path):
    """One byte a second never lets a per-read timeout fire; the handshake deadline does."""
    srv = Server(tmp_path, "--handshake-timeout", "2")
    try:
        dropped_after, answer = _drip(srv.port, 1.0)
        assert 1.9 <= dropped_after <= 2.0 + 3.0, dropped_after
        reply = P._loads(answer.splitlines()[0])
        assert reply["error"]["code"] == P.TIMEOUT
        assert "2 s" in reply["error"]["message"]
        conn = srv.client()
        assert "result" in conn.call("ping")
        conn.close()
    finally:
        srv.stop()


@pytest.mark.parametrize("idle", [200, MAX_PENDING + 100])
def test_idle_unauthenticated_connections_do_not_lock_out_a_client(tmp_path, idle):
    """Idle connections (no bytes, never closed), also more than the server holds, leave room
    for a real client's exec, under a memory limit that a thread per connection exhausts."""
    srv = Server(tmp_path, "--memory-mb", "256")
    hostile = []
    try:
        before = rss(srv)
        for _ in range(idle):
            hostile.append(socket.create_connection(("127.0.0.1", srv.port), timeout=10))

        async def work() -> str:
            sandbox = await client.connect(f"tcp://127.0.0.1:{srv.port}", TOKEN,
                                           connect_timeout_s=10)
            try:
                result = await sandbox.exec("echo still-served")
                return result.stdout
            finally:
                await sandbox.close()

        assert asyncio.run(work()) == "still-served\n"
        assert srv.proc.poll() is None
        growth = rss(srv) - before
        assert growth < RSS_GROWTH_BOUND, f"server RSS grew by {growth / MB:.1f} MB"
    finally:
        for sock in hostile:
            sock.close()
        srv.stop()


#: Opens idle connections as fast as it can (keeping the newest 1500) until killed.
CHURN = """
import socket, sys
held, opened = [], 0
while True:
    s = socket.socket(); s.setblocking(False)
    s.connect_ex(("127.0.0.1", int(sys.argv[1]))); held.append(s)
    if len(held) > 1500: held.pop(0).close()
    opened += 1
    if opened == 3000: print("flooding", flush=True)
"""


def test_a_connection_flood_does_not_push_out_clients(server):
    """Two processes open thousands of idle connections a second; a client that connects in
    the middle of it is read before the oldest connections are evicted, so it gets in."""
    floods = [subprocess.Popen([sys.executable, "-c", CHURN, str(server.port)],
                               stdout=subprocess.PIPE, text=True) for _ in range(2)]

    async def clients() -> list[str]:
        out = []
        for _ in range(10):
            sandbox = await client.connect(f"tcp://127.0.0.1:{server.port}", TOKEN,
                                           connect_timeout_s=10)
            try:
                out.append((await sandbox.exec("echo in")).stdout)
            finally:
                await sandbox.close()
        return out

    try:
        for flood in floods:  # 3000 connections each, far past what the server holds
            assert flood.stdout.readline() == "flooding\n"
        assert asyncio.run(clients()) == ["in\n"] * 10
    finally:
        for flood in floods:
            flood.kill()
            flood.wait()
            flood.stdout.close()


def test_an_oversized_frame_after_auth_is_refused_clearly(tmp_path):
    """An authenticated client that sends 8 MB past a 1 MB limit reads a FRAME_TOO_LARGE error
    (not a reset that discards it), then the connection ends; other clients are unaffected."""
    srv = Server(tmp_path, "--max-frame-bytes", str(MB))
    try:
        bystander = srv.client()
        conn = srv.client()
        payload = b'{"jsonrpc":"2.0","id":7,"method":"ping","params":{"x":"' + b"x" * (8 * MB)

        def send() -> None:
            try:
                conn.sock.sendall(payload + b'"}}\n')
            except OSError:
                pass

        with PeakRss(srv) as peak:
            sender = threading.Thread(target=send)
            sender.start()
            reply = conn.recv()
            sender.join(30)
        assert reply["error"]["code"] == P.FRAME_TOO_LARGE
        assert f"limit of {MB} bytes" in reply["error"]["message"]
        assert conn.closed()
        assert peak.peak - peak.proc.memory_info().rss < RSS_GROWTH_BOUND
        assert "result" in bystander.call("ping")
        fresh = srv.client()
        assert "result" in fresh.call("ping")
        for c in (bystander, conn, fresh):
            c.close()
    finally:
        srv.stop()


def test_a_nesting_bomb_after_auth_is_answered_and_the_connection_stays_in_step(server):
    """A frame nested 100 000 deep (within the size limit) is a parse error, not a dropped
    connection."""
    conn = server.client()
    conn.raw(b'{"jsonrpc":"2.0","id":3,"method":"ping","params":{"x":' + b"[" * 100_000
             + b"]" * 100_000 + b"}}\n")
    reply = conn.recv()
    assert reply is not None, "the connection was dropped"
    assert reply["error"]["code"] == P.PARSE_ERROR and "nested" in reply["error"]["message"]
    assert "result" in conn.call("ping")
    conn.close()


@pytest.mark.parametrize("value", ["soon", "0", "-1", "inf", "nan", "601"])
def test_the_handshake_deadline_option_is_checked(tmp_path, value):
    srv = Server(tmp_path, "--handshake-timeout", value)
    try:
        assert srv.proc.wait(10) != 0 and not srv.ready
        assert f"--handshake-timeout = {value!r}".encode() in srv.proc.stderr.read()
    finally:
        srv.stop()
