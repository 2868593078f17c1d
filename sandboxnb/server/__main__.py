"""Entry point: ``python3 -m sandboxnb.server [options]``, and the zipapp's ``__main__``.

Once listening it prints one line to stdout for humans (launchers do not need it)::

    SANDBOXNB_READY {"port": N, "pid": P, "protocol": 1}
"""

from __future__ import annotations

import _thread
import os
import sys

from . import wire as P
from .lifecycle import Server
from .listen import listen
from .log import log
from .options import TOKEN_ENV, parse_args

READY_PREFIX = "SANDBOXNB_READY "


def main(argv: list[str] | None = None) -> int:
    """Run the server until shutdown or the dead-man switch fires."""
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    token = os.environ.pop(TOKEN_ENV, None)
    if opts["token_fd"] is not None:  # a pipe: the token never sits in /proc/PID/environ
        token = _read_token(opts["token_fd"])
    if not token:
        log(f"--token-fd or env {TOKEN_ENV} is required (the per-sandbox secret); refusing "
            "to start")
        return 2
    if opts["memory_mb"]:
        import resource

        limit = opts["memory_mb"] * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    if opts["max_processes"]:  # counted per user namespace: bounds a jailed sandbox's processes
        import resource

        n = opts["max_processes"]
        _soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
        if hard != resource.RLIM_INFINITY:
            n = min(n, hard)
        resource.setrlimit(resource.RLIMIT_NPROC, (n, n))
    if opts["workdir"]:
        os.makedirs(opts["workdir"], exist_ok=True)
        os.chdir(opts["workdir"])
    try:
        listener, port = listen(opts)
    except OSError as exc:
        where = opts["unix"] or f"{opts['host']}:{opts['port']}"
        log(f"cannot listen on {where}: {exc}")
        return 1
    server = Server(opts, token, listener)
    import _signal

    _signal.signal(_signal.SIGTERM, lambda *_: server.terminate())
    _thread.stack_size(1 << 20)  # keeps address space small under RLIMIT_AS
    ready = (f'{READY_PREFIX}{{"port": {"null" if port is None else port}, '
             f'"pid": {os.getpid()}, "protocol": {P.PROTOCOL_VERSION}}}\n')
    os.write(1, ready.encode())
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.exit(130)
    return 0


def _read_token(fd: int) -> str:
    chunks = []
    try:
        while True:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            chunks.append(chunk)
    except OSError:
        return ""
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    return b"".join(chunks).decode("utf-8", "replace").strip()


if __name__ == "__main__":
    sys.exit(main())

