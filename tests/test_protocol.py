"""Wire format: framing, validation, error codes, and the shipped bundle."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import sandboxnb.server
from sandboxnb.bundle import BUNDLE_NAME, build_bundle, bundle_bytes, bundle_path
from sandboxnb.server import wire as P

from .helpers import pid_alive, wait_until


def test_roundtrip_is_one_ascii_line():
    frame = P.encode(P.request(7, "exec", {"cmd": "echo 'ü'\nnext"}))
    assert frame.endswith(b"\n") and frame.count(b"\n") == 1
    frame.decode("ascii")
    message = P.decode(frame)
    assert message == {"jsonrpc": "2.0", "id": 7, "method": "exec",
                       "params": {"cmd": "echo 'ü'\nnext"}}


def test_responses_and_notifications():
    assert P.decode(P.encode(P.response(1, {"ok": True})))["result"] == {"ok": True}
    err = P.decode(P.encode(P.error_response(2, P.TIMEOUT, "late", {"x": 1})))["error"]
    assert err == {"code": P.TIMEOUT, "message": "late", "data": {"x": 1}}
    note = P.decode(P.encode(P.notification("output", {"id": 1, "stream": "stdout", "data": "x"})))
    assert "id" not in note and note["method"] == "output"


def test_encode_rejects_oversized_frames():
    with pytest.raises(P.FrameError) as info:
        P.encode(P.request(1, "write_file", {"data": "x" * 200}), max_bytes=100)
    assert info.value.code == P.FRAME_TOO_LARGE and info.value.id == 1


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"{not json\n", P.PARSE_ERROR),
        (b"\xff\xfe\n", P.PARSE_ERROR),
        (b"[1, 2]\n", P.INVALID_REQUEST),
        (b'{"id": 1, "method": "ping"}\n', P.INVALID_REQUEST),
        (b'{"jsonrpc": "2.0", "id": [1], "method": "ping"}\n', P.INVALID_REQUEST),
        (b'{"jsonrpc": "2.0", "id": 1, "method": 5}\n', P.INVALID_REQUEST),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "ping", "params": [1]}\n', P.INVALID_PARAMS),
        (b'{"jsonrpc": "2.0", "id": 1}\n', P.INVALID_REQUEST),
        (b"x" * 50 + b"\n", P.FRAME_TOO_LARGE),
    ],
)
def test_decode_rejects_bad_frames(frame, code):
    with pytest.raises(P.FrameError) as info:
        P.decode(frame, max_bytes=40 if code == P.FRAME_TOO_LARGE else P.MAX_FRAME_BYTES)
    assert info.value.code == code


def test_error_codes_are_distinct_and_named():
    codes = [getattr(P, name) for name in P.__all__ if name.isupper() and name not in (
        "PROTOCOL_VERSION", "MAX_FRAME_BYTES", "MAX_FILE_BYTES", "METHODS")]
    assert len(codes) == len(set(codes))
    assert all(P.error_name(code) != f"error {code}" for code in codes)
    assert P.PROTOCOL_VERSION == 1 and P.MAX_FRAME_BYTES == 32 * 1024 * 1024


def test_bundle_is_deterministic_and_holds_every_server_module():
    data = bundle_bytes()
    assert build_bundle() == data
    names = set(zipfile.ZipFile(io.BytesIO(data)).namelist())
    server_dir = Path(sandboxnb.server.__file__).parent
    sources = {"__main__.py", "sandboxnb/__init__.py"} | {
        f"sandboxnb/server/{path.name}" for path in server_dir.glob("*.py")
    }
    assert {"sandboxnb/server/__init__.py", "sandboxnb/server/wire.py"} <= sources
    assert {name for name in names if name.endswith(".py")} == sources
    assert any(name.endswith(".pyc") for name in names)
    lean = set(zipfile.ZipFile(io.BytesIO(build_bundle(compiled=False))).namelist())
    assert lean == sources  # what a command line carries: the sources alone
    path = bundle_path()
    assert "sandboxnb.server" in path.name and path.read_bytes() == data
    assert BUNDLE_NAME.startswith("sandboxnb.server")


def test_bundle_fits_on_a_command_line():
    """Modal starts the server with the bundle compressed and base64-encoded in its command,
    and caps a command at 64 KiB: the bundle must leave room for the server's options."""
    from sandboxnb.providers.modal import _bootstrap

    size = sum(len(arg.encode()) + 1 for arg in _bootstrap())
    assert size < 60 * 1024, f"{size} bytes: the server bundle outgrew Modal's command limit"


def _oldest_python() -> str | None:
    for candidate in (Path.home() / ".pyenv/versions").glob("3.9*/bin/python3.9"):
        return str(candidate)
    return None


def _call(stream, req_id: int, method: str, **params) -> tuple[dict, dict[str, str]]:
    """One request over a raw stream: its response and the output notified before it."""
    stream.write(P.encode(P.request(req_id, method, params)))
    stream.flush()
    output = {"stdout": "", "stderr": ""}
    while True:
        message = json.loads(stream.readline())
        if message.get("method") == "output" and message["params"]["id"] == req_id:
            output[message["params"]["stream"]] += message["params"]["data"]
        elif message.get("id") == req_id:
            return message, output


@pytest.mark.parametrize("python", [sys.executable, "oldest"])
def test_bundle_serves_exec_and_python_on_a_bare_interpreter(python, tmp_path):
    """The zipapp as providers start it (``-S -E -s``: no site-packages, so no sandboxnb but the
    bundle's), on this Python and on the oldest supported one (3.9): a real exec and python round
    trip, then the dead-man switch ends the server and its Python worker."""
    if python == "oldest":
        python = _oldest_python()
        assert python is not None, "the Python 3.9 compatibility check needs pyenv's 3.9"
    version = subprocess.run([python, "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    env = {"SANDBOXNB_TOKEN": "t", "PATH": os.environ["PATH"]}
    proc = subprocess.Popen(
        [python, "-S", "-E", "-s", str(bundle_path()), "--idle-timeout", "0.5",
         "--workdir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path,
    )
    try:
        line = proc.stdout.readline().decode()
        assert line.startswith("SANDBOXNB_READY ")
        ready = json.loads(line.split(" ", 1)[1])
        assert ready["protocol"] == 1 and ready["pid"] == proc.pid and ready["port"] > 0
        with socket.create_connection(("127.0.0.1", ready["port"]), timeout=30) as sock:
            stream = sock.makefile("rwb")
            info = _call(stream, 1, "auth", token="t", protocol=1)[0]["result"]
            assert str(tuple(int(n) for n in info["python"].split(".")[:2])) == version
            reply, output = _call(stream, 2, "exec", cmd="echo out; echo err >&2; exit 3")
            assert reply["result"]["exit_code"] == 3
            assert output == {"stdout": "out\n", "stderr": "err\n"}
            code = "import os, sys\nprint('hi')\nworker = os.getpid()\nsys.version_info[:2]"
            reply, output = _call(stream, 3, "python", code=code)
            assert reply["result"] == {"value": version, "error": None}
            assert output["stdout"] == "hi\n"
            worker = int(_call(stream, 4, "python", code="worker")[0]["result"]["value"])
            error = _call(stream, 5, "python", code="x = 1\nx / 0")[0]["result"]["error"]
            assert error["type"] == "ZeroDivisionError"
            assert 'File "<sandbox-3>", line 2' in error["traceback"]
            stream.close()
        assert proc.wait(10) == 0  # dead-man switch: idle after the client left
        wait_until(lambda: not pid_alive(worker), 5, f"the worker {worker} to end")
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
