"""Fuzzing the sandbox server over real sockets (hypothesis, derandomized so CI is repeatable).

Before authentication: random bytes and mutated frames (wrong-token auth, exec/python/write_file
that would create a canary file) never run anything and only ever get an error. After it:
valid JSON with wrong types, huge numbers, unknown methods, odd ids, nesting bombs and unicode
edge cases are answered and the connection stays in step. After every example the server still
answers a fresh client, and its memory stays within a bound over the whole run.
"""

from __future__ import annotations

import json
import socket
import time

import psutil
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sandboxnb.server import wire as P

from .test_server import TOKEN, Conn, Server

pytestmark = pytest.mark.slow

MB = 1024 * 1024
#: How far the server's resident memory may grow over a whole fuzz run.
RSS_GROWTH_BOUND = 32 * MB
FUZZ = settings(max_examples=800, derandomize=True, database=None, deadline=None,
                suppress_health_check=list(HealthCheck), print_blob=False)
#: Error codes a connection may get before it has authenticated.
PRE_AUTH_CODES = {P.PARSE_ERROR, P.INVALID_REQUEST, P.INVALID_PARAMS, P.AUTH_REQUIRED,
                  P.AUTH_FAILED, P.PROTOCOL_MISMATCH, P.FRAME_TOO_LARGE}
#: Strings that are awkward for JSON, UTF-8, shells and paths (as JSON string bodies).
ODD_STRINGS = ["", "\\ud800", "\\udfff", "\\udc00\\ud800", "\\u0000", "\\u2028\\u2029", "\\ufeff",
               "\\u202e", "\u00e9\u0301", "\U0001f600" * 50, "a" * 3000, "\\\\", "\\n\\r\\t",
               "%s%n", "${IFS}", "../../..", "/"]


def rss(server: Server) -> int:
    return psutil.Process(server.proc.pid).memory_info().rss


def frame(method: str, params: dict, req_id: object = 1) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": req_id, "method": method,
                       "params": params}).encode() + b"\n"


# ---- mutations ---------------------------------------------------------------------------------
@st.composite
def mutated(draw: st.DrawFn, bases: list[bytes]) -> bytes:
    """One of ``bases`` with a few byte-level mutations (flip, insert, delete, repeat, cut)."""
    data = bytearray(draw(st.sampled_from(bases)))
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "repeat", "cut"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 8))]
        elif kind == "repeat":
            data[at:at] = data[at:at + draw(st.integers(1, 64))] * draw(st.integers(1, 80))
        else:
            del data[at:]
    return bytes(data)


# ---- before authentication ---------------------------------------------------------------------
def _pre_auth_bases(canary: str) -> list[bytes]:
    near_miss = TOKEN[:-1] + chr(ord(TOKEN[-1]) ^ 1)
    return [
        frame("auth", {"token": near_miss, "protocol": 1}),
        frame("auth", {"token": "", "protocol": 1}),
        frame("auth", {"protocol": 1}),
        frame("auth", {"token": near_miss, "protocol": 99}),
        frame("exec", {"cmd": f"touch {canary}"}),
        frame("exec", {"cmd": ["touch", canary]}),
        frame("python", {"code": f"open({canary!r}, 'w').close()"}),
        frame("write_file", {"path": canary, "data": "eA=="}),
        frame("ping", {}),
    ]


def _read_to_eof(sock: socket.socket, timeout: float = 15.0) -> bytes:
    sock.settimeout(timeout)
    chunks = []
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def test_fuzz_before_auth_never_runs_anything(tmp_path):
    srv = Server(tmp_path)
    canary = tmp_path / "canary"
    bases = _pre_auth_bases(str(canary))
    exec_canary = bases[4]
    chunk = st.one_of(st.binary(max_size=6000), mutated(bases))
    examples = 0
    try:
        probe = srv.client()
        before = rss(srv)

        @FUZZ
        @given(chunks=st.lists(chunk, min_size=1, max_size=4), then_exec=st.booleans())
        def check(chunks: list[bytes], then_exec: bool) -> None:
            nonlocal examples
            assume(all(TOKEN.encode() not in c for c in chunks))
            examples += 1
            sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            try:
                try:
                    for data in [*chunks, exec_canary] if then_exec else chunks:
                        sock.sendall(data)
                    sock.shutdown(socket.SHUT_WR)
                except OSError:  # refused and closed while we were still sending
                    pass
                answer = _read_to_eof(sock)
            finally:
                sock.close()
            replies = [json.loads(line) for line in answer.splitlines()]
            assert len(replies) <= 1, replies
            for reply in replies:
                assert "result" not in reply and reply["error"]["code"] in PRE_AUTH_CODES, reply
            assert not canary.exists(), f"{chunks!r} ran something before auth"
            assert "result" in probe.call("ping")

        check()
        fresh = srv.client()
        assert "result" in fresh.call("ping")
        after = rss(srv)
        print(f"\nbefore auth: {examples} examples, server RSS {before / MB:.1f} -> "
              f"{after / MB:.1f} MB")
        assert after - before < RSS_GROWTH_BOUND
        assert not canary.exists()
        for conn in (probe, fresh):
            conn.close()
    finally:
        srv.stop()


# ---- after authentication ----------------------------------------------------------------------
JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**60), 10**60), st.floats(allow_nan=False),
    st.sampled_from([10**4000, -(10**4000), 1e308, -1e308, 5e-324]),
    st.text(max_size=40),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)
#: Methods fuzzed with any parameters (none runs a command or touches a file).
FREE_METHODS = ["ping", "cancel", "auth", "nosuchmethod", "", "exec ", "PING", "__class__",
                "handlers", "run", "\u0000"]
#: Methods that act: their key parameter is either a wrong type or one harmless value.
ACTING = {
    "exec": ("cmd", ["true", ["true"], ["sh", "-c", "exit 3"]]),
    "python": ("code", ["1 + 1", "raise ValueError('x')", ""]),
    "write_file": ("path", ["fuzz.txt", "sub/fuzz.txt"]),
    "read_file": ("path", ["fuzz.txt", "/dev/null", "no/such/file"]),
}
PARAM_NAMES = ["cmd", "code", "path", "data", "cwd", "env", "stdin", "timeout", "id", "mode",
               "max_bytes", "token", "protocol", "reset", "x"]
WRONG_TYPES = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                        st.lists(JSON_SCALARS, max_size=3),
                        st.dictionaries(st.text(max_size=5), JSON_SCALARS, max_size=3))


@st.composite
def post_auth_message(draw: st.DrawFn) -> bytes:
    """One frame (a line) for an authenticated connection."""
    kind = draw(st.sampled_from(["free", "acting", "odd_id", "bomb", "unicode", "raw"]))
    if kind == "bomb":
        depth = draw(st.sampled_from([1000, 50_000, 400_000]))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
        inner = opener * depth + b"1" + closer * depth
        return b'{"jsonrpc":"2.0","id":9,"method":"ping","params":{"x":' + inner + b"}}\n"
    if kind == "unicode":
        text = draw(st.sampled_from(ODD_STRINGS))
        method = draw(st.sampled_from(["ping", "cancel", "nosuchmethod", "exec", "read_file"]))
        key = {"exec": "cwd", "read_file": "path"}.get(method, "id")
        if method == "exec":
            extra = ', "cmd": "true"'
        elif method == "read_file":
            text = "fuzz-" + text.replace("/", "_").replace(".", "_")
            extra = ""
        else:
            extra = ""
        return (f'{{"jsonrpc":"2.0","id":"{text}","method":"{method}",'
                f'"params":{{"{key}":"{text}"{extra}}}}}\n').encode()
    if kind == "raw":
        return draw(mutated([frame("ping", {}), frame("cancel", {"id": 1}),
                             frame("exec", {"cmd": "true", "timeout": 5}),
                             frame("read_file", {"path": "fuzz.txt"})]))
    req_id = draw(st.one_of(st.integers(-(10**30), 10**30), st.text(max_size=20)))
    if kind == "odd_id":
        req_id = draw(JSON_VALUES)
    params = draw(st.dictionaries(st.sampled_from(PARAM_NAMES), JSON_VALUES, max_size=5))
    if kind == "acting":
        method = draw(st.sampled_from(sorted(ACTING)))
        key, harmless = ACTING[method]
        params[key] = draw(st.one_of(WRONG_TYPES, st.sampled_from(harmless)))
    else:
        method = draw(st.sampled_from(FREE_METHODS) | st.text(max_size=12))
        assume(method != "shutdown")
    top = {"jsonrpc": "2.0", "id": req_id, "method": method, "params": params}
    if draw(st.booleans()):  # the envelope itself wrong
        field = draw(st.sampled_from(["jsonrpc", "method", "params"]))
        top[field] = draw(WRONG_TYPES)
        assume(top.get("method") != "shutdown")
    return json.dumps(top).encode() + b"\n"


def _answered(conn: Conn, probe_id: str, timeout: float = 30.0) -> list[dict]:
    """Send a ping with ``probe_id``; return what came before its answer (fail on a hang)."""
    conn.raw(frame("ping", {}, probe_id))
    conn.sock.settimeout(timeout)
    seen = []
    while True:
        message = conn.recv()
        assert message is not None, "the server closed the connection"
        if message.get("id") == probe_id and "method" not in message:
            assert "result" in message
            return seen
        seen.append(message)


def _short(frames: list[bytes]) -> str:
    return ", ".join(repr(f[:300]) + (f"... ({len(f)} bytes)" if len(f) > 300 else "")
                     for f in frames)


def test_fuzz_after_auth_keeps_the_connection_in_step(tmp_path):
    srv = Server(tmp_path)
    (srv.workdir / "fuzz.txt").write_text("fuzz")
    examples = 0
    try:
        conns = [srv.client()]  # the last one is in use; replaced after a failed example
        before = rss(srv)
        started = time.monotonic()

        @FUZZ
        @given(frames=st.lists(post_auth_message(), min_size=1, max_size=3))
        def check(frames: list[bytes]) -> None:
            nonlocal examples
            assume(all(b"shutdown" not in f for f in frames))
            examples += 1
            conn = conns[-1]
            conns.append(srv.client())  # used next unless this example passes
            for data in frames:
                conn.raw(data if data.endswith(b"\n") else data + b"\n")
            try:
                seen = _answered(conn, f"probe-{examples}")
            except OSError as exc:
                raise AssertionError(f"no answer after {_short(frames)}: {exc}") from None
            for message in seen:
                if "method" in message:
                    assert message["method"] == "output"
                else:
                    assert ("result" in message) != ("error" in message), message
            assert srv.proc.poll() is None
            conns.pop().close()

        check()
        elapsed = time.monotonic() - started
        fresh = srv.client()
        assert "result" in fresh.call("ping")
        after = rss(srv)
        print(f"\nafter auth: {examples} examples in {elapsed:.1f} s, server RSS "
              f"{before / MB:.1f} -> {after / MB:.1f} MB")
        assert after - before < RSS_GROWTH_BOUND
        for c in (*conns, fresh):
            c.close()
    finally:
        srv.stop()
