"""The notebook layer: ``%load_ext sandboxnb``, the ``%sandbox`` magics, rich displays, widgets.

Only this package imports IPython/ipywidgets, lazily; the core never imports it. One module per
job, each using the others' public names only:

* :mod:`~sandboxnb.notebook.lifecycle`: load, unload, kernel shutdown and exit hooks;
* :mod:`~sandboxnb.notebook.sandboxes`: the one owner of interactive sandboxes;
* :mod:`~sandboxnb.notebook.handle`: the handle a launched sandbox gets in the namespace;
* :mod:`~sandboxnb.notebook.loop`: the bridge to the kernel's asyncio loop;
* :mod:`~sandboxnb.notebook.form`, :mod:`~sandboxnb.notebook.monitor_state`: the widgets' logic;
* :mod:`~sandboxnb.notebook.reprs`: HTML/text rendering; :mod:`~sandboxnb.notebook.display`:
  its registration with IPython's display formatters;
* :mod:`~sandboxnb.notebook.widgets`, :mod:`~sandboxnb.notebook.magics`: the views.
"""

from __future__ import annotations

from typing import Any

__all__ = ["launcher", "load_ipython_extension", "monitor", "unload_ipython_extension"]


def load_ipython_extension(ip: Any) -> None:
    """Register ``%sandbox`` / ``%%sandbox``, the settings ``SandboxMagics``, rich displays and
    the release hooks on ``ip``."""
    from sandboxnb.notebook.lifecycle import load

    load(ip)


def unload_ipython_extension(ip: Any) -> None:
    """Stop every sandbox launched from this session and unregister the extension."""
    from sandboxnb.notebook.lifecycle import unload

    unload(ip)


def launcher(**defaults: Any) -> Any:
    """A form to start sandboxes (the provider and one field per runtime option, as the
    ``--cpu``, ``--run-timeout``... flags of the magics and the CLI) and a live table of running
    ones with a Stop button each. ``defaults`` pre-fill fields (``provider="local"``,
    ``cpu=1``, ``run_timeout_s=600``...)."""
    from sandboxnb.notebook.widgets import Launcher

    return Launcher(**defaults)


def monitor(run: Any) -> Any:
    """Live view of a :class:`~sandboxnb.scheduler.Run`: progress, counts, mean reward, newest
    rows, reward histogram, and a Cancel button."""
    from sandboxnb.notebook.widgets import Monitor

    return Monitor(run)
