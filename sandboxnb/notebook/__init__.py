"""The notebook layer: ``%load_ext sandboxnb``, the ``%sandbox`` magics and the widgets.

Only this package imports IPython/ipywidgets, lazily: loading the extension registers the magics
and the shutdown hooks (kernel shutdown cancels background runs and stops sandboxes) and nothing
else; widgets are imported when ``launcher()`` / ``monitor()`` are first called. Everything runs
on the kernel's own asyncio loop (see :mod:`sandboxnb.notebook.loop`).
"""

from __future__ import annotations

import atexit
from typing import Any

__all__ = ["launcher", "load_ipython_extension", "monitor", "unload_ipython_extension"]

_loaded: dict[int, Any] = {}
_atexit_registered = False


def load_ipython_extension(ip: Any) -> None:
    """Register ``%sandbox`` / ``%%sandbox`` and the settings ``SandboxMagics`` on ``ip``."""
    global _atexit_registered
    from sandboxnb.notebook.loop import remember_kernel_loop
    from sandboxnb.notebook.magics import SandboxMagics
    from sandboxnb.notebook.shutdown import at_exit, hook_kernel_shutdown

    if id(ip) in _loaded:
        return
    remember_kernel_loop()
    magics = SandboxMagics(shell=ip, parent=ip)
    ip.register_magics(magics)
    if magics not in ip.configurables:
        ip.configurables.append(magics)
    _loaded[id(ip)] = magics
    hook_kernel_shutdown(ip)
    if not _atexit_registered:
        atexit.register(at_exit)
        _atexit_registered = True


def unload_ipython_extension(ip: Any) -> None:
    """Stop every sandbox launched from this session and unregister the magics."""
    from sandboxnb.notebook.shutdown import unhook_kernel_shutdown

    magics = _loaded.pop(id(ip), None)
    unhook_kernel_shutdown(ip)
    _release_all()
    if magics is None:
        return
    from sandboxnb.notebook.state import SandboxHandle

    for name, value in list(ip.user_ns.items()):
        if isinstance(value, SandboxHandle):
            del ip.user_ns[name]
    table = ip.magics_manager.magics
    for kind in ("line", "cell"):
        table[kind].pop("sandbox", None)
    ip.magics_manager.registry.pop(type(magics).__name__, None)
    if magics in ip.configurables:
        ip.configurables.remove(magics)


def _release_all() -> None:
    """Stop every interactive sandbox (extension unload and interpreter exit)."""
    from sandboxnb.notebook import state

    current = state._manager
    if current is not None:
        current.stop_all()
        state._reset_manager()


def launcher(**defaults: Any) -> Any:
    """A form to start sandboxes (provider, image, CPU, memory, GPU, timeout) and a live table
    of running ones with a Stop button each. ``defaults`` pre-fill fields
    (``provider="local"``, ``cpu=1``...)."""
    from sandboxnb.notebook.widgets import Launcher

    return Launcher(**defaults)


def monitor(run: Any) -> Any:
    """Live view of a :class:`~sandboxnb.scheduler.Run`: progress, counts, mean reward, newest
    rows, reward histogram, and a Cancel button."""
    from sandboxnb.notebook.widgets import Monitor

    return Monitor(run)
