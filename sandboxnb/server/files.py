"""``write_file`` and ``read_file``: whole files as base64, within the file size limit."""

from __future__ import annotations

import os

from . import wire as P
from .params import ParamError, param, resolve

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .connection import Connection


def write_file(conn: Connection, req_id: Any, params: dict[str, Any]) -> None:
    import base64
    import binascii

    server = conn.server
    path = resolve(server.workdir, param(params, "path", str, required=True))
    encoded = param(params, "data", str, default="")
    mode = param(params, "mode", int)
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
        with open(path, "wb") as fh:
            fh.write(data)
        if mode is not None:
            os.chmod(path, mode)
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
        with open(path, "rb") as fh:
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


def _too_large(op: str, path: str, size: int, limit: int) -> str:
    return f"{op} {path!r}: {size} bytes exceeds the file size limit of {limit} bytes"
