"""``exec``: a command in its own process group, output streamed as it comes, timeout and kill.

Killing is by process group (SIGKILL), so a timeout or cancel also ends what the command started
in the background. ``subprocess``, ``select`` and ``codecs`` load on the first ``exec``.
"""

from __future__ import annotations

import _thread
import os
import time

from . import wire as P
from .jobs import GROUPS_LOCK, exited, forget_group, signal_group
from .options import TOKEN_ENV
from .params import ParamError, b64, param, resolve, text, timeout_param

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .jobs import Job

#: After the command exits, how long to keep reading output its leftovers still write.
DRAIN_GRACE_S = 0.05


def run_exec(job: Job, params: dict[str, Any], prepare: bool) -> Any:
    """The ``exec`` job runner (see :mod:`.jobs`)."""
    if prepare:
        return _prepare(job.conn.server, params)
    argv, cwd, env, stdin, timeout = job.prepared
    _exec(job, argv, cwd, env, stdin, timeout)
    return None


def _prepare(server: Any, params: dict[str, Any]) -> tuple[Any, ...]:
    cmd = param(params, "cmd", (list, str), required=True)
    if isinstance(cmd, list):
        if not cmd or not all(isinstance(a, str) for a in cmd):
            raise ParamError(f"parameter cmd = {cmd!r} must be a non-empty list of strings "
                             "or a shell command string")
        argv = [text("cmd", a, True) for a in cmd]
    else:
        argv = ["/bin/sh", "-c", text("cmd", cmd, True)]
    cwd = resolve(server.workdir, param(params, "cwd", str, default=server.workdir), "cwd")
    if not os.path.isdir(cwd):
        raise ParamError(f"parameter cwd = {cwd!r} is not a directory")
    env = dict(server.child_env)
    for key, value in (param(params, "env", dict, default={})).items():
        if not text("env", key, True) or "=" in key:
            raise ParamError(f"parameter env name {key!r} is empty or holds '='")
        if value is None:
            env.pop(key, None)
        elif not isinstance(value, str):
            raise ParamError(f"parameter env[{key!r}] = {value!r} must be a string or null")
        else:
            env[key] = text("env", value, True)
    env.pop(TOKEN_ENV, None)
    if "stdin" in params and "stdin_b64" in params:
        raise ParamError("parameters stdin and stdin_b64 exclude each other")
    stdin = param(params, "stdin", str, default="").encode()  # text, or bytes as stdin_b64
    stdin = b64("stdin_b64", param(params, "stdin_b64", str, default="")) or stdin or None
    return argv, cwd, env, stdin, timeout_param(params)


def _exec(job: Job, argv: list[str], cwd: str, env: dict[str, str], stdin: bytes | None,
          timeout: float | None) -> None:
    import _signal
    import codecs
    import select
    import subprocess

    conn, req_id, server = job.conn, job.req_id, job.conn.server
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            start_new_session=True, close_fds=True,
        )
    except OSError as exc:
        conn.output(req_id, "stderr", f"sandboxnb: cannot execute {argv[0]!r}: {exc.strerror}\n")
        conn.reply(req_id, {"exit_code": 127, "timed_out": False,
                            "duration_s": time.monotonic() - started})
        return
    pgid = proc.pid
    with GROUPS_LOCK:
        server.process_groups.add(pgid)

    def kill() -> None:
        signal_group(server, pgid, _signal.SIGKILL)

    job.on_cancel = kill
    if job.cancelled:
        kill()
    if stdin is not None:
        _thread.start_new_thread(_feed_stdin, (proc.stdin, stdin))
    streams = {proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr"}
    decoders = {fd: codecs.getincrementaldecoder("utf-8")("replace") for fd in streams}
    poller = select.poll()
    for fd in streams:
        poller.register(fd, select.POLLIN)
    pidfd = -1
    try:
        pidfd = os.pidfd_open(proc.pid)
        poller.register(pidfd, select.POLLIN)
    except (AttributeError, OSError):
        pass  # no pidfd (old kernel or Python): poll the child instead
    deadline = started + timeout if timeout is not None else None
    timed_out = False
    exited_at = None
    open_fds = set(streams)
    while open_fds:
        now = time.monotonic()
        if exited_at is not None:
            wait: float | None = max(0.0, exited_at + DRAIN_GRACE_S - now)
        elif deadline is not None:
            wait = max(0.0, deadline - now)
        else:
            wait = None
        if pidfd < 0 and exited_at is None:
            wait = 0.05 if wait is None else min(wait, 0.05)
        events = poller.poll(None if wait is None else int(wait * 1000) + 1)
        if not events:
            if exited_at is not None:
                break
            if pidfd < 0 and exited(pgid):
                exited_at = time.monotonic()
                continue
            if deadline is not None and time.monotonic() >= deadline:
                timed_out = True
                kill()
                deadline = None
            continue
        for fd, _ev in events:
            if fd == pidfd:
                poller.unregister(pidfd)
                os.close(pidfd)
                pidfd = -2
                exited_at = time.monotonic()
                continue
            data = os.read(fd, 1 << 16)
            if data:
                conn.output(req_id, streams[fd], decoders[fd].decode(data))
            else:
                poller.unregister(fd)
                open_fds.discard(fd)
                conn.output(req_id, streams[fd], decoders[fd].decode(b"", True))
    if pidfd >= 0:
        os.close(pidfd)
    proc.stdout.close()
    proc.stderr.close()
    if deadline is not None and not exited(pgid):
        while not exited(pgid) and time.monotonic() < deadline:
            time.sleep(0.01)
        if not exited(pgid):
            timed_out = True
            kill()
    if timed_out or job.cancelled:
        kill()  # also reaps grandchildren that kept running after the child exited
    forget_group(server, pgid)  # before reaping: its pid may be reused once reaped
    exit_code = proc.wait()
    if job.cancelled and not timed_out:
        conn.fail(req_id, P.CANCELLED, "exec cancelled; its process group was killed")
        return
    conn.reply(req_id, {"exit_code": exit_code, "timed_out": timed_out,
                        "duration_s": time.monotonic() - started})


def _feed_stdin(pipe: Any, data: bytes) -> None:
    try:
        pipe.write(data)
    except OSError:
        pass
    finally:
        try:
            pipe.close()
        except OSError:
            pass
