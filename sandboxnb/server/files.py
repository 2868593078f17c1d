"""``write_file`` and ``read_file``: whole regular files as base64, within the file size limit.
Anything else (FIFO, socket, device, directory) is refused at once: nothing may block."""

from __future__ import annotations

import errno
import os
import stat

from . import wire as P
from .params import ParamError, b64, param, resolve

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .connection import Connection


def write_file(conn: Connection, req_id: Any, params: dict[str, Any]) -> None:
    server = conn.server
    path = resolve(server.workdir, param(params, "path", str, required=True))
    encoded = param(params, "data", str, default="")
    mode = param(params, "mode", int)
    if mode is not None and not 0 <= mode <= 0o777:
        raise ParamError(f"parameter mode = {mode!r} must be 0 to 0o777 (no setuid/setgid/sticky)")
    mkdirs = param(params, "mkdirs", bool, default=True)
    if len(encoded) * 3 // 4 > server.max_file + 3:
        conn.fail(req_id, P.FILE_TOO_LARGE, _too_large("write_file", path, len(encoded) * 3 // 4,
                                                        server.max_file))
        return
    data = b64("data", encoded)
    if len(data) > server.max_file:
        conn.fail(req_id, P.FILE_TOO_LARGE,
                  _too_large("write_file", path, len(data), server.max_file))
        return
    try:
        if mkdirs:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(_open(path, os.O_WRONLY | os.O_CREAT), "wb") as fh:
            os.ftruncate(fh.fileno(), 0)
            fh.write(data)
            if mode is not None:
                os.fchmod(fh.fileno(), mode)
    except OSError as exc:
        conn.fail(req_id, P.FILE_ERROR, f"write_file {path!r}: {exc.strerror or exc}",
                  {"errno": exc.errno, "path": path})
        return
    conn.reply(req_id, {"path": path, "size": len(data)})


def read_file(conn: Connection, req_id: Any, params: dict[str, Any]) -> None:
    import binascii

    server = conn.server
    path = resolve(server.workdir, param(params, "path", str, required=True))
    limit = min(param(params, "max_bytes", int, default=server.max_file), server.max_file)
    try:
        with open(_open(path, os.O_RDONLY), "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > limit:
                conn.fail(req_id, P.FILE_TOO_LARGE, _too_large("read_file", path, size, limit),
                          {"path": path, "size": size, "limit": limit})
                return
            data = fh.read(limit + 1)
    except OSError as exc:
        conn.fail(req_id, P.FILE_ERROR, f"read_file {path!r}: {exc.strerror or exc}",
                  {"errno": exc.errno, "path": path})
        return
    if len(data) > limit:
        conn.fail(req_id, P.FILE_TOO_LARGE, _too_large("read_file", path, len(data), limit))
        return
    conn.reply(req_id, {"data": binascii.b2a_base64(data, newline=False).decode("ascii"),
                        "size": len(data)})


def _regular(st: os.stat_result) -> None:
    kind = dict(d="directory", p="FIFO", s="socket", c="character device", b="block device")
    if not stat.S_ISREG(st.st_mode):
        kind = kind.get(stat.filemode(st.st_mode)[0], "special file")
        raise OSError(errno.EINVAL, f"not a regular file (it is a {kind})")


def _open(path: str, flags: int) -> int:
    """A regular file's fd (stat before, fstat after; O_NONBLOCK: a FIFO cannot hang it)."""
    if os.path.exists(path):
        _regular(os.stat(path))
    fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, 0o666)
    try:
        _regular(os.fstat(fd))
        os.set_blocking(fd, True)
    except OSError:
        os.close(fd)
        raise
    return fd


def _too_large(op: str, path: str, size: int, limit: int) -> str:
    return f"{op} {path!r}: {size} bytes exceeds the file size limit of {limit} bytes"
