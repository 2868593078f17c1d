"""Diagnostics on stderr, one line each, prefixed with the server's pid."""

from __future__ import annotations

import os
import sys


def log(message: str) -> None:
    """Write one line to stderr; never raises (stderr may be closed)."""
    try:
        sys.stderr.write(f"sandboxnb.server[{os.getpid()}]: {message}\n")
        sys.stderr.flush()
    except Exception:
        pass
