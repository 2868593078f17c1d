"""sandboxnb: run AI-agent evaluations in isolated sandboxes from Jupyter.

The top level imports lazily, so ``python -m sandboxnb.server`` and ``%load_ext sandboxnb`` stay
fast and the core never imports IPython.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "RuntimeConfig": "sandboxnb.config",
    "Resources": "sandboxnb.config",
    "Limits": "sandboxnb.config",
    "GPU": "sandboxnb.config",
    "SandboxnbError": "sandboxnb.errors",
    "ConfigError": "sandboxnb.errors",
    "ProviderError": "sandboxnb.errors",
    "Task": "sandboxnb.tasks",
    "Taskset": "sandboxnb.tasks",
    "Grade": "sandboxnb.tasks",
    "Run": "sandboxnb.scheduler",
    "run": "sandboxnb.scheduler",
    "start": "sandboxnb.scheduler",
    "Pool": "sandboxnb.pool",
    "load": "sandboxnb.results",
    "Results": "sandboxnb.results",
    "compare": "sandboxnb.compare",
    "launch": "sandboxnb.interactive",
    "attach": "sandboxnb.interactive",
    "connect": "sandboxnb.client",
    "Sandbox": "sandboxnb.client",
    "get_provider": "sandboxnb.providers",
    "launcher": "sandboxnb.notebook",
    "monitor": "sandboxnb.notebook",
}

__all__ = [*_EXPORTS, "load_ipython_extension", "unload_ipython_extension"]


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sandboxnb' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def load_ipython_extension(ipython: object) -> None:
    """``%load_ext sandboxnb``: register the magics and the kernel-loop bridge."""
    from sandboxnb.notebook import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython: object) -> None:
    """``%unload_ext sandboxnb``: release every sandbox the extension launched."""
    from sandboxnb.notebook import unload_ipython_extension as unload

    unload(ipython)
