"""Async client for the sandbox server: one framed stream, one reader task, heartbeats.

```python
sb = await connect(endpoint)                       # or connect("tcp://127.0.0.1:PORT", token=...)
r = await sb.exec("echo hi", timeout=10)            # ExecResult(exit_code=0, stdout="hi\\n", ...)
p = await sb.python("x = 1\\nx + 1")                # PythonResult(value="2", ...)
await sb.close()
```

Every call fails with :class:`~sandboxnb.errors.ConnectionLost` as soon as the connection drops
or stops answering heartbeats. Cancelling an awaiting ``exec``/``python`` call sends ``cancel``
so the remote work is killed too.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from sandboxnb.errors import (
    AuthenticationError,
    ConfigError,
    ConnectionLost,
    ProtocolError,
    RemoteError,
    RemotePythonError,
    SandboxError,
    SandboxTimeout,
)
from sandboxnb.server import wire as P

if TYPE_CHECKING:
    from sandboxnb.providers.base import Endpoint

__all__ = ["ExecResult", "OutputCallback", "PythonResult", "Sandbox", "connect"]

log = logging.getLogger("sandboxnb.client")

#: ``on_output(stream, data)`` with stream ``"stdout"`` or ``"stderr"``.
OutputCallback = Callable[[str, str], Any]
TLS_CA_ENV = "SANDBOXNB_TLS_CA_FILE"
_dumps = P._dumps
_AUTH_CODES = (P.AUTH_FAILED, P.AUTH_REQUIRED, P.PROTOCOL_MISMATCH)


@dataclass
class ExecResult:
    """Outcome of :meth:`Sandbox.exec`. A timed-out command has ``timed_out=True``."""

    exit_code: int
    stdout: str = ""
    stderr: str = ""
    timed_out: bool = False
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        """True when the command exited 0 within its timeout."""
        return self.exit_code == 0 and not self.timed_out


@dataclass
class PythonResult:
    """Outcome of :meth:`Sandbox.python`: the last expression's repr, output, or the error."""

    value: str | None
    stdout: str = ""
    stderr: str = ""
    error: dict[str, str] | None = field(default=None)

    @property
    def ok(self) -> bool:
        return self.error is None

    def raise_for_error(self) -> None:
        """Raise :class:`RemotePythonError` if the code raised."""
        if self.error is not None:
            raise RemotePythonError(
                self.error.get("type", "Exception"), self.error.get("message", ""),
                self.error.get("traceback", ""),
            )


def _parse_url(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    if parts.scheme == "unix":
        path = parts.path or parts.netloc
        if not path:
            raise ConfigError(f"endpoint url = {url!r}: unix:// needs a socket path")
        return "unix", path, None
    if parts.scheme in ("tcp", "tls"):
        if not parts.hostname or parts.port is None:
            raise ConfigError(f"endpoint url = {url!r}: expected {parts.scheme}://HOST:PORT")
        return parts.scheme, parts.hostname, parts.port
    raise ConfigError(
        f"endpoint url = {url!r}: unsupported scheme; accepted: tcp://HOST:PORT, "
        "tls://HOST:PORT, unix:///PATH"
    )


#: Default cap of each captured output stream of one call (16 Mi characters).
DEFAULT_MAX_OUTPUT_CHARS = 16 * 1024 * 1024
#: How much of the newest exec/python output a sandbox remembers (:attr:`Sandbox.output_tail`).
OUTPUT_TAIL_CHARS = 2048


def _check_timeout(timeout: Any) -> None:
    """A remote deadline is refused before it is sent unless it is a sane number of seconds."""
    if timeout is None:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not (
            0 < timeout <= P.MAX_TIMEOUT_S):
        raise ConfigError(f"timeout = {timeout!r}: expected seconds > 0 and <= "
                          f"{P.MAX_TIMEOUT_S:.0f}, or None for no timeout")


def _tls_context() -> Any:
    """The client's TLS context, built once per CA file version (loading trust stores costs
    ~20 ms a time)."""
    ca_file = os.environ.get(TLS_CA_ENV) or None
    version = None
    if ca_file:
        with contextlib.suppress(OSError):
            stat = os.stat(ca_file)
            version = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
    return _tls_context_for(ca_file, version)


@functools.lru_cache(maxsize=8)
def _tls_context_for(ca_file: str | None, version: object) -> Any:
    import ssl

    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    return context


async def connect(
    endpoint_or_url: Endpoint | str,
    token: str | None = None,
    *,
    heartbeat_s: float | None = 3.0,
    heartbeat_timeout_s: float | None = None,
    connect_timeout_s: float = 10.0,
    max_frame_bytes: int = P.MAX_FRAME_BYTES,
) -> Sandbox:
    """Open a connection to a sandbox server, authenticate, start heartbeats.

    ``endpoint_or_url`` is an :class:`~sandboxnb.providers.base.Endpoint` (its token is used
    unless ``token`` is given) or a ``tcp://``/``tls://``/``unix://`` URL. Heartbeats ping every
    ``heartbeat_s`` seconds (None disables them); no answer within ``heartbeat_timeout_s``
    (default ``2 * heartbeat_s``, at least 1 s) drops the connection with ConnectionLost.
    """
    endpoint = None
    if isinstance(endpoint_or_url, str):
        url = endpoint_or_url
    else:
        endpoint = endpoint_or_url
        url = endpoint.url
        token = token if token is not None else endpoint.token
    if not token:
        raise AuthenticationError(f"no token given for {url} (pass token=... or an Endpoint)")
    scheme, host, port = _parse_url(url)
    try:
        if scheme == "unix":
            opening = asyncio.open_unix_connection(host, limit=max_frame_bytes + 1)
        else:
            ssl = _tls_context() if scheme == "tls" else None
            opening = asyncio.open_connection(host, port, limit=max_frame_bytes + 1, ssl=ssl)
        async with asyncio.timeout(connect_timeout_s):
            reader, writer = await opening
    except TimeoutError:
        raise SandboxTimeout(f"connecting to {url} took longer than {connect_timeout_s}s") from None
    except OSError as exc:
        raise ConnectionLost(f"cannot connect to {url}: {exc}") from exc
    sandbox = Sandbox(reader, writer, url=url, endpoint=endpoint, max_frame_bytes=max_frame_bytes)
    try:
        async with asyncio.timeout(connect_timeout_s):
            info = await sandbox._request(
                "auth", {"token": token, "protocol": P.PROTOCOL_VERSION})
    except RemoteError as exc:
        await sandbox.close()
        if exc.code in _AUTH_CODES:
            raise AuthenticationError(f"{url}: {exc.message}") from None
        raise
    except TimeoutError:
        await sandbox.close()
        raise SandboxTimeout(f"{url} did not answer auth within {connect_timeout_s}s") from None
    except BaseException:
        await sandbox.close()
        raise
    sandbox.info = info
    if heartbeat_s:
        timeout = heartbeat_timeout_s or max(2.0 * heartbeat_s, 1.0)
        sandbox._heartbeat_task = asyncio.get_running_loop().create_task(
            sandbox._heartbeat(heartbeat_s, timeout)
        )
    return sandbox


class Sandbox:
    """A connected sandbox. Create with :func:`connect` (or ``sandboxnb.launch``)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, url: str,
                 endpoint: Endpoint | None = None,
                 max_frame_bytes: int = P.MAX_FRAME_BYTES) -> None:
        self._reader = reader
        self._writer = writer
        self._url = url
        self.endpoint = endpoint
        self.info: dict[str, Any] = {}
        self._max_frame = max_frame_bytes
        #: How much of each output stream ``exec``/``python`` results keep (streaming callbacks
        #: see everything); set it per sandbox.
        self.max_output_chars = DEFAULT_MAX_OUTPUT_CHARS
        self._tail: list[str] = []  # the newest output of exec/python, both streams (bounded)
        self._tail_chars = 0
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._listeners: dict[int, Callable[[str, str], None]] = {}
        self._lost: ConnectionLost | None = None
        self._closed = False
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()
        self._reader_task = self._loop.create_task(self._read_loop())

    # -- identity -----------------------------------------------------------------------------

    @property
    def id(self) -> str:
        """The sandbox id (from the endpoint, else from the server, else the url)."""
        if self.endpoint is not None:
            return self.endpoint.sandbox_id
        return self.info.get("sandbox_id") or self._url

    @property
    def provider(self) -> str | None:
        return self.endpoint.provider if self.endpoint is not None else None

    @property
    def config(self) -> Any:
        return self.endpoint.config if self.endpoint is not None else None

    @property
    def url(self) -> str:
        return self._url

    @property
    def closed(self) -> bool:
        """True once closed by us or lost."""
        return self._closed or self._lost is not None

    @property
    def output_tail(self) -> str:
        """The last :data:`OUTPUT_TAIL_CHARS` characters of output ``exec``/``python`` streamed
        (stdout and stderr as they arrived): what a failed rollout's row shows."""
        return "".join(self._tail)[-OUTPUT_TAIL_CHARS:]

    def _remember_output(self, data: str) -> None:
        self._tail.append(data[-OUTPUT_TAIL_CHARS:])
        self._tail_chars += len(self._tail[-1])
        while self._tail_chars - len(self._tail[0]) >= OUTPUT_TAIL_CHARS:
            self._tail_chars -= len(self._tail.pop(0))

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("lost" if self._lost else "open")
        return (f"<Sandbox id={self.id!r} provider={self.provider or 'attached'} "
                f"url={self._url} {state}>")

    # -- plumbing -----------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        reason = "connection closed by the server"
        reader = self._reader
        loads = P._loads
        try:
            while True:
                line = await reader.readline()
                if not line or line[-1:] != b"\n":
                    break
                try:
                    message = loads(line)
                    if "method" in message:
                        if message["method"] == "output":
                            params = message["params"]
                            callback = self._listeners.get(params.get("id"))
                            if callback is not None:
                                self._deliver(callback, params)
                        continue
                    future = self._pending.pop(message["id"], None)
                except (ValueError, KeyError, TypeError, AttributeError) as exc:
                    raise ProtocolError(f"malformed frame from the server: {exc}") from None
                if future is not None and not future.done():
                    future.set_result(message)
        except asyncio.CancelledError:
            reason = "connection closed by the client"
            raise
        except ValueError:  # asyncio: the line exceeds the stream limit
            reason = f"the server sent a frame larger than {self._max_frame} bytes"
        except ProtocolError as exc:
            reason = str(exc)
        except (OSError, asyncio.IncompleteReadError) as exc:
            reason = f"connection error: {exc}"
        finally:
            self._connection_lost(reason)

    def _deliver(self, callback: Callable[[str, str], None], params: dict[str, Any]) -> None:
        """Hand streamed output to the caller's callback; a failing callback is logged and
        never takes the connection down."""
        try:
            callback(params.get("stream", "stdout"), params.get("data", ""))
        except Exception:
            log.exception("%s: on_output callback %r failed", self._url, callback)

    def _connection_lost(self, reason: str) -> None:
        if self._lost is None:
            self._lost = ConnectionLost(f"{self._url}: {reason}")
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(ConnectionLost(str(self._lost)))
        if self._heartbeat_task is not None and self._heartbeat_task is not asyncio.current_task():
            self._heartbeat_task.cancel()
        if not self._writer.is_closing():
            self._writer.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ConnectionLost(f"{self._url}: the sandbox connection is closed")
        if self._lost is not None:
            raise ConnectionLost(str(self._lost))

    async def _request(self, method: str, params: dict[str, Any],
                       on_output: Callable[[str, str], None] | None = None,
                       cancel_remote: bool = False) -> Any:
        """Send one request and wait for its response; return ``result`` or raise."""
        self._check_open()
        req_id = next(self._ids)
        frame = _dumps({"jsonrpc": "2.0", "id": req_id, "method": method, "params": params})
        frame = frame.encode("ascii") + b"\n"
        if len(frame) > self._max_frame:
            raise RemoteError(P.FRAME_TOO_LARGE, f"{method}: a frame of {len(frame)} bytes "
                              f"exceeds the limit of {self._max_frame} bytes")
        future = self._loop.create_future()
        self._pending[req_id] = future
        if on_output is not None:
            self._listeners[req_id] = on_output
        try:
            self._writer.write(frame)
            if len(frame) > 1 << 16:
                await self._writer.drain()
            message = await future
        except asyncio.CancelledError:
            if cancel_remote and self._lost is None and not self._writer.is_closing():
                try:
                    self._writer.write(P.encode(P.request(None, "cancel", {"id": req_id})))
                except Exception:
                    pass
            raise
        except (ConnectionError, OSError) as exc:
            self._connection_lost(f"connection error: {exc}")
            raise ConnectionLost(str(self._lost)) from None
        finally:
            self._pending.pop(req_id, None)
            self._listeners.pop(req_id, None)
        error = message.get("error")
        if error is not None:
            code = error.get("code", P.INTERNAL_ERROR)
            text = error.get("message", P.error_name(code))
            if code == P.TIMEOUT:
                raise SandboxTimeout(f"{method}: {text}", error.get("data"))
            raise RemoteError(code, text, error.get("data"))
        return message.get("result")

    async def _heartbeat(self, interval: float, answer_within: float) -> None:
        while self._lost is None and not self._closed:
            await asyncio.sleep(interval)
            sent = time.monotonic()
            try:
                await asyncio.wait_for(self._request("ping", {}), answer_within)
            except TimeoutError:
                if self._writer.transport.get_write_buffer_size() > 0:
                    continue  # still uploading a large frame: the server is busy reading it
                self._connection_lost(
                    f"no heartbeat answer within {answer_within:g}s (ping sent "
                    f"{time.monotonic() - sent:.1f}s ago); the server is dead or unreachable"
                )
                return
            except SandboxError:
                return

    # -- public API ---------------------------------------------------------------------------

    async def exec(
        self,
        cmd: list[str] | str,
        *,
        cwd: str | None = None,
        env: dict[str, str | None] | None = None,
        stdin: str | bytes | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (a remote deadline, enforced remotely)
        on_output: OutputCallback | None = None,
    ) -> ExecResult:
        """Run a command (argv list, or a string for ``/bin/sh -c``); stream its output.

        ``env`` is merged over the server's environment (None values unset). On ``timeout``
        the whole process group is killed and the result has ``timed_out=True``.
        """
        _check_timeout(timeout)
        if isinstance(cmd, (list, tuple)):
            cmd = [str(a) for a in cmd]
        elif not isinstance(cmd, str):
            raise ConfigError(f"cmd = {cmd!r}: expected a list of arguments or a shell string")
        if isinstance(stdin, bytes):
            stdin = stdin.decode()
        stdout: list[str] = []
        stderr: list[str] = []
        params: dict[str, Any] = {"cmd": cmd}
        for key, value in (("cwd", cwd), ("env", env), ("stdin", stdin), ("timeout", timeout)):
            if value is not None:
                params[key] = value
        result = await self._request(
            "exec", params, self._collector(stdout, stderr, on_output), cancel_remote=True
        )
        return ExecResult(
            exit_code=result["exit_code"], stdout="".join(stdout), stderr="".join(stderr),
            timed_out=bool(result.get("timed_out")), duration_s=result.get("duration_s", 0.0),
        )

    async def python(
        self,
        code: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (a remote deadline, enforced remotely)
        on_output: OutputCallback | None = None,
        check: bool = True,
    ) -> PythonResult:
        """Run code in the sandbox's persistent Python namespace.

        Returns the repr of the last expression (or None). With ``check=True`` a remote
        exception raises :class:`RemotePythonError`; a timeout raises :class:`SandboxTimeout`
        after interrupting the code (the namespace survives unless it refused to stop).
        """
        _check_timeout(timeout)
        stdout: list[str] = []
        stderr: list[str] = []
        params: dict[str, Any] = {"code": code}
        if timeout is not None:
            params["timeout"] = timeout
        result = await self._request(
            "python", params, self._collector(stdout, stderr, on_output), cancel_remote=True
        )
        out = PythonResult(value=result.get("value"), stdout="".join(stdout),
                           stderr="".join(stderr), error=result.get("error"))
        if check:
            out.raise_for_error()
        return out

    async def write_file(self, path: str, data: bytes | str, mode: int | None = None) -> str:
        """Write ``data`` to ``path`` in the sandbox (parents created); return the absolute path."""
        import binascii

        if isinstance(data, str):
            data = data.encode()
        limit = self.info.get("max_file_bytes", P.MAX_FILE_BYTES)
        if len(data) > limit:
            raise RemoteError(
                P.FILE_TOO_LARGE,
                f"write_file {path!r}: {len(data)} bytes exceeds the file size limit of "
                f"{limit} bytes",
            )
        params: dict[str, Any] = {
            "path": path, "data": binascii.b2a_base64(data, newline=False).decode("ascii"),
        }
        if mode is not None:
            params["mode"] = mode
        result = await self._request("write_file", params)
        return result["path"]

    async def read_file(self, path: str) -> bytes:
        """Read a file from the sandbox."""
        import binascii

        result = await self._request("read_file", {"path": path})
        return binascii.a2b_base64(result["data"])

    async def ping(self) -> float:
        """Round trip to the server, in seconds."""
        start = time.perf_counter()
        await self._request("ping", {})
        return time.perf_counter() - start

    async def shutdown(self) -> None:
        """Ask the server to kill its children and exit, then close the connection."""
        try:
            if self._lost is None and not self._closed:
                await asyncio.wait_for(self._request("shutdown", {}), 5.0)
        except (TimeoutError, ConnectionLost):
            pass
        finally:
            await self.close()

    async def close(self) -> None:
        """Close the connection (idempotent). The server keeps running until its idle timeout."""
        if self._closed:
            return
        self._closed = True
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
        self._reader_task.cancel()
        self._connection_lost("connection closed by the client")
        try:
            await asyncio.wait_for(self._writer.wait_closed(), 1.0)
        except Exception:
            pass

    async def __aenter__(self) -> Sandbox:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    def _collector(self, stdout: list[str], stderr: list[str],
                   on_output: OutputCallback | None) -> Callable[[str, str], None]:
        """Keep at most :attr:`max_output_chars` of each stream (then a marker saying how much
        was cut); ``on_output`` still sees everything."""
        limit = self.max_output_chars
        kept = {"stdout": 0, "stderr": 0}
        cut = {"stdout": 0, "stderr": 0}

        def collect(stream: str, data: str) -> None:
            self._remember_output(data)
            name = "stderr" if stream == "stderr" else "stdout"
            parts = stderr if name == "stderr" else stdout
            room = limit - kept[name]
            if room > 0:
                parts.append(data[:room])
                kept[name] += min(room, len(data))
            if len(data) > room:
                if not cut[name]:
                    parts.append("")  # the marker's place
                cut[name] += len(data) - max(room, 0)
                parts[-1] = (f"\n[... {cut[name]} more characters of {name} cut: over "
                             f"max_output_chars={limit}]\n")
            if on_output is not None:
                try:
                    on_output(stream, data)
                except Exception:
                    log.exception("on_output callback raised; output continues")

        return collect
