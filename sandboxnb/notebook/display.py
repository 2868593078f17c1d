"""Rich displays of core objects, registered with IPython's display formatters when the
extension loads (the core classes keep plain reprs and never import IPython):

* a :class:`~sandboxnb.scheduler.Run` shows as its live monitor widget in a kernel (an HTML
  summary line elsewhere, and as the ``text/html`` of the bundle);
* a client :class:`~sandboxnb.client.Sandbox` shows as a small HTML table.

Registration is by module and class name, so loading the extension imports neither class.
"""

from __future__ import annotations

import contextlib
from typing import Any

from sandboxnb.notebook.reprs import run_summary_html, sandbox_html

__all__ = ["register", "unregister"]

RUN = ("sandboxnb.scheduler", "Run")
SANDBOX = ("sandboxnb.client", "Sandbox")


def _in_kernel(ip: Any) -> bool:
    return getattr(ip, "kernel", None) is not None


def _run_bundle(ip: Any) -> Any:
    def bundle(run: Any) -> dict[str, Any] | None:
        """The live monitor's widget bundle in a kernel; nothing elsewhere (the other
        formatters give text and HTML). Never blocks."""
        if not _in_kernel(ip):
            return None
        try:
            from sandboxnb.notebook.widgets import Monitor
        except ImportError:  # ipywidgets missing: plain displays
            return None
        data, _metadata = ip.display_formatter.format(Monitor(run))
        return {**data, "text/plain": repr(run), "text/html": run_summary_html(run)}

    return bundle


def register(ip: Any) -> None:
    """Register the rich displays on shell ``ip``."""
    formatter = ip.display_formatter
    formatter.formatters["text/html"].for_type_by_name(*RUN, run_summary_html)
    formatter.formatters["text/html"].for_type_by_name(*SANDBOX, sandbox_html)
    formatter.mimebundle_formatter.for_type_by_name(*RUN, _run_bundle(ip))


def unregister(ip: Any) -> None:
    """Undo :func:`register` (extension unload)."""
    formatter = ip.display_formatter
    for target, key in (
        (formatter.formatters["text/html"], RUN),
        (formatter.formatters["text/html"], SANDBOX),
        (formatter.mimebundle_formatter, RUN),
    ):
        with contextlib.suppress(KeyError):
            target.pop(".".join(key), None)
