"""``write_file`` and ``read_file``: whole regular files as base64, within the file size limit.

Both run on the connection's reader thread, so neither may block: files are opened with
``O_NONBLOCK`` (a FIFO with no peer cannot hold the open) and anything that ``fstat`` does not
call a regular file (a FIFO, socket, device or directory) is refused before a byte moves.
Symlinks are followed: the whole file system is the sandbox's own.
"""

from __future__ import annotations

import errno
import os
import stat

from . import wire as P
from .params import ParamError, mode_param, param, path_param

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .connection import Connection

_KINDS = ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
          (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"))


class NotRegular(OSError):
    """The path names something other than a regular file."""

    def __init__(self, op: str, path: str, st_mode: int) -> None:
        kind = next((name for test, name in _KINDS if test(st_mode)), "special file")
        super().__init__(errno.EISDIR if kind == "directory" else errno.EINVAL,
                         f"{op} {path!r}: not a regular file (it is a {kind}); only regular "
                         "files can be read or written")


def write_file(conn: Connection, req_id: Any, params: dict[str, Any]) -> None:
    import base64
    import binascii

    server = conn.server
    path = path_param(params, server.workdir)
    encoded = param(params, "data", str, default="")
    mode = mode_param(params)
    mkdirs = param(params, "mkdirs", bool, default=True)
    if len(encoded) * 3 // 4 > server.max_file + 3:
        conn.fail(req_id, P.FILE_TOO_LARGE, _too_large("write_file", path, len(encoded) * 3 // 4,
                                                        server.max_file))
        return
    try:
        data = base64.b64decode(encoded, validate=True)
    except binascii.Error as exc:
        raise ParamError(f"parameter data is not valid base64: {exc}") from None
    if len(data) > server.max_file:
        conn.fail(req_id, P.FILE_TOO_LARGE,
                  _too_large("write_file", path, len(data), server.max_file))
        return
    try:
        if mkdirs:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fd = _open_regular("write_file", path, os.O_WRONLY | os.O_CREAT)
        try:
            os.ftruncate(fd, 0)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if mode is not None:
                os.fchmod(fd, mode)
        finally:
            os.close(fd)
    except OSError as exc:
        _file_error(conn, req_id, "write_file", path, exc)
        return
    conn.reply(req_id, {"path": path, "size": len(data)})


def read_file(conn: Connection, req_id: Any, params: dict[str, Any]) -> None:
    import binascii

    server = conn.server
    path = path_param(params, server.workdir)
    limit = min(param(params, "max_bytes", int, default=server.max_file), server.max_file)
    try:
        fd = _open_regular("read_file", path, os.O_RDONLY)
        with open(fd, "rb") as fh:
            size = os.fstat(fd).st_size
            if size > limit:
                conn.fail(req_id, P.FILE_TOO_LARGE, _too_large("read_file", path, size, limit),
                          {"path": path, "size": size, "limit": limit})
                return
            data = fh.read(limit + 1)
    except OSError as exc:
        _file_error(conn, req_id, "read_file", path, exc)
        return
    if len(data) > limit:
        conn.fail(req_id, P.FILE_TOO_LARGE, _too_large("read_file", path, len(data), limit))
        return
    conn.reply(req_id, {"data": binascii.b2a_base64(data, newline=False).decode("ascii"),
                        "size": len(data)})


def _open_regular(op: str, path: str, flags: int) -> int:
    """An fd of the regular file at ``path`` (blocking again), or NotRegular/OSError. Never
    blocks on a FIFO, never opens a device that is there already, never truncates or otherwise
    touches what is not a regular file (checked before the open, and on the fd after it)."""
    try:
        st_mode = os.stat(path).st_mode
    except OSError:
        pass  # missing (write_file creates it) or unreadable: the open says which
    else:
        if not stat.S_ISREG(st_mode):
            raise NotRegular(op, path, st_mode)
    fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, 0o666)
    try:
        st_mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(st_mode):
            raise NotRegular(op, path, st_mode)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _file_error(conn: Connection, req_id: Any, op: str, path: str, exc: OSError) -> None:
    message = exc.strerror if isinstance(exc, NotRegular) else (
        f"{op} {path!r}: {exc.strerror or exc}")
    conn.fail(req_id, P.FILE_ERROR, message, {"errno": exc.errno, "path": path})


def _too_large(op: str, path: str, size: int, limit: int) -> str:
    return f"{op} {path!r}: {size} bytes exceeds the file size limit of {limit} bytes"
