"""The server's command line, and where its token comes from.

``argparse`` is avoided on purpose: importing it costs startup time.
"""

from __future__ import annotations

from . import wire

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

#: The per-sandbox secret; read once at start and removed from the environment.
TOKEN_ENV = "SANDBOXNB_TOKEN"
#: The longest ``--handshake-timeout`` accepted.
MAX_HANDSHAKE_S = 600.0

USAGE = (
    "usage: python3 -m sandboxnb.server [--host 127.0.0.1] [--port 0] [--unix PATH] "
    "[--sandbox-id ID] [--idle-timeout S] [--startup-timeout S] [--handshake-timeout S] "
    "[--memory-mb N] "
    "[--workdir DIR] [--max-frame-bytes N] [--max-file-bytes N] [--owner-pid PID] "
    "[--listen-fd FD] [--token-fd FD] [--max-processes N] [--remove-dir DIR]\n"
    f"The token is read from --token-fd (a pipe, closed after reading) or env {TOKEN_ENV}."
)
_OPTIONS = {
    "--host": str,
    "--port": int,
    "--unix": str,
    "--sandbox-id": str,
    "--idle-timeout": float,
    "--startup-timeout": float,
    "--handshake-timeout": float,
    "--memory-mb": int,
    "--workdir": str,
    "--max-frame-bytes": int,
    "--max-file-bytes": int,
    "--owner-pid": int,
    "--listen-fd": int,
    "--token-fd": int,
    "--max-processes": int,
    "--remove-dir": str,
}
#: The dead-man switch's window when ``--idle-timeout`` is not given (the client library's
#: default limit, ``sandboxnb.config.DEFAULT_IDLE_TIMEOUT_S``, is the same).
IDLE_TIMEOUT_S = 15.0


def parse_args(argv: list[str]) -> dict[str, Any]:
    """Options by name (``--idle-timeout`` -> ``idle_timeout``); SystemExit on a bad command line.

    A number <= 0 (other than ``--port``) means "none": it disables that timeout or limit;
    except ``--handshake-timeout``, which always applies (> 0 and at most 600 s).
    """
    opts: dict[str, Any] = {
        "host": "127.0.0.1", "port": 0, "unix": None, "sandbox_id": None,
        "idle_timeout": IDLE_TIMEOUT_S, "startup_timeout": 60.0,
        "handshake_timeout": wire.HANDSHAKE_TIMEOUT_S, "memory_mb": None, "workdir": None,
        "max_frame_bytes": wire.MAX_FRAME_BYTES, "max_file_bytes": wire.MAX_FILE_BYTES,
        "owner_pid": None, "listen_fd": None, "token_fd": None, "max_processes": None,
        "remove_dir": None,
    }
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(USAGE)
            raise SystemExit(0)
        name, eq, value = arg.partition("=")
        if name not in _OPTIONS:
            raise SystemExit(f"sandboxnb.server: unknown option {arg!r}\n{USAGE}")
        if not eq:
            i += 1
            if i >= len(argv):
                raise SystemExit(f"sandboxnb.server: option {name} needs a value\n{USAGE}")
            value = argv[i]
        try:
            parsed = _OPTIONS[name](value)
        except ValueError:
            raise SystemExit(
                f"sandboxnb.server: {name} = {value!r} is not a valid "
                f"{_OPTIONS[name].__name__}"
            ) from None
        if name == "--handshake-timeout" and not 0 < parsed <= MAX_HANDSHAKE_S:
            raise SystemExit(
                f"sandboxnb.server: {name} = {value!r} must be > 0 and <= {MAX_HANDSHAKE_S:g} "
                "seconds (the deadline for a whole handshake)"
            )
        if isinstance(parsed, (int, float)) and name != "--port" and parsed <= 0:
            parsed = None  # 0 disables a timeout / limit
        opts[name[2:].replace("-", "_")] = parsed
        i += 1
    return opts
