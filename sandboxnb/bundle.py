"""The sandbox server as one shippable file: a zipapp of every module of :mod:`sandboxnb.server`.

Host side only (it never ships). Providers copy :func:`bundle_bytes` into an image, or run
:func:`bundle_path` locally, as ``python3 -S -E -s sandboxnb.server.pyz [options]``; the bundle
needs nothing but the standard library of any Python >= 3.9.
"""

from __future__ import annotations

import functools
import hashlib
import io
import marshal
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

#: File name providers give the bundle inside a sandbox.
BUNDLE_NAME = "sandboxnb.server.pyz"

_SERVER_DIR = Path(__file__).resolve().parent / "server"
_MAIN = "import sys\nfrom sandboxnb.server.__main__ import main\nsys.exit(main())\n"
_INIT = '"""sandboxnb sandbox server bundle (stdlib only)."""\n'
_DATE = (2020, 1, 1, 0, 0, 0)


def build_bundle(*, compiled: bool = True) -> bytes:
    """Build the zipapp: ``__main__.py``, a stub ``sandboxnb`` package, ``sandboxnb/server/*.py``.

    Deterministic (sorted members, fixed timestamps). With ``compiled``, next to each server
    module it carries an unchecked hash-based .pyc for this interpreter, so a matching
    interpreter skips compiling (about 16 ms of server start here) and others fall back to the
    sources; without, it is less than half the size (for a bundle sent on a command line).
    """
    files = {"__main__.py": _MAIN.encode(), "sandboxnb/__init__.py": _INIT.encode()}
    for path in sorted(_SERVER_DIR.glob("*.py")):
        files[f"sandboxnb/server/{path.name}"] = path.read_bytes()
    pycs = _compile({name: data for name, data in files.items()
                     if name.startswith("sandboxnb/")}) if compiled else {}
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for name, data in files.items():
            _add(zf, name, data)
            if name in pycs:
                _add(zf, name + "c", pycs[name])
    return out.getvalue()


@functools.cache
def bundle_bytes(*, compiled: bool = True) -> bytes:
    """The zipapp (built once per process); run it as ``python3 -S -E -s X.pyz [options]``."""
    return build_bundle(compiled=compiled)


def bundle_path() -> Path:
    """Write the bundle once to a per-user cache file (content-addressed) and return its path."""
    data = bundle_bytes()
    digest = hashlib.sha256(data).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / f"sandboxnb-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    path = folder / f"{BUNDLE_NAME.removesuffix('.pyz')}-{digest}.pyz"
    if not path.exists() or path.stat().st_size != len(data):
        tmp = folder / f".{path.name}.{os.getpid()}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return path


def _add(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=_DATE)
    info.external_attr = 0o644 << 16
    zf.writestr(info, data)


#: Compiles sources (a marshalled {name: bytes} on stdin) to .pyc bytes (marshalled on stdout).
_COMPILER = """
import importlib.util, marshal, sys
from importlib import _bootstrap_external
pycs = {}
for name, source in marshal.loads(sys.stdin.buffer.read()).items():
    code = compile(source, "<sandboxnb.server bundle>/" + name, "exec", dont_inherit=True)
    hashed = importlib.util.source_hash(source)
    pycs[name] = bytes(_bootstrap_external._code_to_hash_pyc(code, hashed, False))
sys.stdout.buffer.write(marshal.dumps(pycs))
"""


def _compile(sources: dict[str, bytes]) -> dict[str, bytes]:
    """.pyc bytes by name; {} if compiling fails (the bundle then runs from sources).

    Compiled in a child interpreter with ``-X no_debug_ranges``: column tables compress badly,
    and without them the compressed bundle is a fifth smaller, small enough for providers that
    pass it on a command line. Only carets in tracebacks through server code are lost.
    """
    try:
        done = subprocess.run(
            [sys.executable, "-X", "no_debug_ranges", "-S", "-E", "-s", "-c", _COMPILER],
            input=marshal.dumps(sources), capture_output=True, check=True, timeout=60,
        )
        return marshal.loads(done.stdout)
    except (OSError, subprocess.SubprocessError, ValueError, EOFError, TypeError):
        return {}
