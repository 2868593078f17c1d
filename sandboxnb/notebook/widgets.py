"""Thin ipywidgets views over :mod:`sandboxnb.notebook.form` (launcher) and
:mod:`sandboxnb.notebook.monitor_state` (run monitor).

Callbacks may run on another thread (JupyterLab >= 4.4 routes comm messages through kernel
subshells), so they never block and never touch asyncio objects directly: launching and stopping
go through the sandbox manager, which hands the work to the kernel loop with
``call_soon_threadsafe``; cancelling a run goes through ``Run.cancel`` (thread-safe). Updates
arrive on the kernel loop thread; they only set widget traits.
"""

from __future__ import annotations

import math
import threading
from html import escape
from typing import Any

import ipywidgets as w

from sandboxnb.errors import ConfigError
from sandboxnb.notebook.form import FORM_FIELDS, LauncherController
from sandboxnb.notebook.loop import remember_kernel_loop
from sandboxnb.notebook.monitor_state import MonitorState
from sandboxnb.notebook.reprs import format_age, reward_histogram_svg, table_html
from sandboxnb.options import OPTIONS, Option

__all__ = ["Launcher", "Monitor"]

_ERR = "<span style='color:#cf222e'>{}</span>"
_LABEL = w.Layout(width="130px")


def _row(label: str, widget: w.Widget, error: w.HTML) -> w.HBox:
    return w.HBox([w.Label(label, layout=_LABEL), widget, error])


def _placeholder(opt: Option) -> str:
    if opt.default is None:
        return opt.none_means
    return f"{opt.default_text} (none: {opt.none_means})"


def _text(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:g}" if isinstance(value, float) else str(value)


class Launcher(w.VBox):
    """Form to start sandboxes plus a live table of running ones (each with a Stop button).

    One text field per runtime option (:data:`sandboxnb.options.OPTIONS`), in ``fields`` by
    option name; an empty field leaves the option to its default, ``none`` sets it to None.
    ``defaults`` pre-fill the provider and any field (``cpu=1, memory_mb=512``).
    """

    def __init__(self, controller: LauncherController | None = None, **defaults: Any) -> None:
        unknown = sorted(set(defaults) - set(FORM_FIELDS))
        if unknown:
            raise ConfigError(
                f"launcher({', '.join(unknown)}=...): not a launcher field; accepted: "
                f"{', '.join(FORM_FIELDS)}"
            )
        remember_kernel_loop()  # built in a cell: the loop running here is the kernel's
        self.controller = controller or LauncherController()
        options = []
        for row in self.controller.providers:
            label = row["provider"] if row["available"] else f"{row['provider']} (unavailable)"
            options.append((label, row["provider"]))
        available = [r["provider"] for r in self.controller.providers if r["available"]]
        first = defaults.get("provider") or (available[0] if available else options[0][1])
        self.provider = w.Dropdown(options=options, value=first)
        self.fields: dict[str, w.Text] = {
            opt.name: w.Text(value=_text(defaults.get(opt.name)), placeholder=_placeholder(opt),
                             tooltip=f"{opt.flag}: {opt.help}")
            for opt in OPTIONS
        }
        self.errors = {name: w.HTML("") for name in FORM_FIELDS}
        self.launch_button = w.Button(description="Launch", button_style="primary", icon="play")
        self.launch_button.add_class("sandboxnb-launch")
        self.status = w.HTML("")
        self.table = w.VBox([])
        self.table.add_class("sandboxnb-table")
        self.launch_button.on_click(self._on_launch)
        self.provider.observe(self._on_provider, names="value")
        self._lock = threading.Lock()
        self._last: Any = None
        form = [
            _row("provider", self.provider, self.errors["provider"]),
            *(_row(name, field, self.errors[name]) for name, field in self.fields.items()),
        ]
        super().__init__([*form, w.HBox([self.launch_button, self.status]), self.table])
        self._on_provider()
        self._unsubscribe = self.controller.manager.subscribe(self.refresh)
        self.refresh()

    # ---- form --------------------------------------------------------------------------
    def values(self) -> dict[str, Any]:
        """``{form field: value}``: the provider and the text of every option field."""
        return {"provider": self.provider.value,
                **{name: field.value for name, field in self.fields.items()}}

    def _on_provider(self, *_: Any) -> None:
        info = self.controller.provider_info(self.provider.value) or {}
        if info and not info["available"]:
            self.errors["provider"].value = _ERR.format(escape(f"unavailable: {info['reason']}"))
            self.launch_button.disabled = True
        else:
            supports = info.get("supports", "")
            self.errors["provider"].value = (
                f"<span style='color:#57606a'>supports: {escape(supports)}</span>")
            self.launch_button.disabled = False

    def show_errors(self, errors: dict[str, str]) -> None:
        for name, html in self.errors.items():
            if name == "provider" and name not in errors:
                continue
            html.value = _ERR.format(escape(errors[name])) if name in errors else ""

    def _on_launch(self, *_: Any) -> None:
        errors = self.controller.validate(self.values())
        self.show_errors(errors)
        if errors:
            self.status.value = _ERR.format("fix the highlighted fields; nothing was started")
            return
        try:
            record = self.controller.launch(self.values())
        except Exception as err:  # a race with another launch, or a provider error
            self.status.value = _ERR.format(escape(str(err)))
            return
        self._last = record
        self.status.value = f"starting <b>{escape(record.name)}</b>..."
        self.refresh()

    # ---- table -------------------------------------------------------------------------
    def refresh(self) -> None:
        """Rebuild the table from the manager (safe from any thread)."""
        with self._lock:
            records = self.controller.manager.records()
            rows = [self._table_row(r) for r in records]
            header = w.HTML(
                "<b>sandboxes</b>" if rows else "<i>no sandboxes running</i>"
            )
            self.table.children = [header, *rows]
            last = self._last
            if last is not None:
                if last.state == "running":
                    self.status.value = f"<b>{escape(last.name)}</b> is running"
                elif last.state == "failed":
                    self.status.value = _ERR.format(
                        escape(f"{last.name} failed to start: {last.error}"))

    def _table_row(self, record: Any) -> w.HBox:
        info = record.summary()
        cells = [
            w.HTML(f"<b>{escape(info['name'])}</b>", layout=w.Layout(width="70px")),
            w.Label(info["provider"], layout=w.Layout(width="70px")),
            w.Label(info["id"], layout=w.Layout(width="200px")),
            w.Label(format_age(info["age_s"]), layout=w.Layout(width="60px")),
            w.Label(info["config"], layout=w.Layout(width="260px")),
            w.Label(info["state"], layout=w.Layout(width="70px")),
        ]
        stop = w.Button(description="Stop", icon="stop", button_style="danger",
                        tooltip=f"stop {info['name']}", layout=w.Layout(width="80px"))
        stop.add_class("sandboxnb-stop")
        stop.on_click(lambda _b, name=record.name: self.controller.stop(name))
        row = w.HBox([*cells, stop])
        row.add_class("sandboxnb-row")
        row.add_class(f"sandboxnb-row-{record.name}")
        return row

    def close(self) -> None:
        unsubscribe = getattr(self, "_unsubscribe", None)  # None: refused in __init__
        if unsubscribe is not None:
            unsubscribe()
        super().close()


class Monitor(w.VBox):
    """Live view of a Run: progress, counts, running mean reward, newest rows, reward
    histogram and a Cancel button. Fed by ``run.subscribe`` (rows arrive on the run's loop)."""

    def __init__(self, run: Any) -> None:
        self.run = run
        self.state = MonitorState(run)
        self.progress = w.IntProgress(value=0, min=0, max=max(int(run.total or 0), 1),
                                      description="rollouts")
        self.counts = w.HTML("")
        self.mean = w.HTML("")
        self.newest = w.HTML("")
        self.histogram = w.HTML("")
        self.cancel_button = w.Button(description="Cancel", icon="stop", button_style="warning")
        self.cancel_button.on_click(self._on_cancel)
        self.cancel_button.add_class("sandboxnb-cancel")
        self.status = w.HTML("")
        self._refresh_lock = threading.Lock()  # refreshes come from the loop and the click
        self._cancel_requested = False
        super().__init__([
            w.HBox([self.progress, self.counts]), self.mean,
            w.HBox([self.histogram, self.newest]), w.HBox([self.cancel_button, self.status]),
        ])
        self.add_class("sandboxnb-monitor")
        self._unsubscribe = run.subscribe(self._on_row)
        self._forget_end = run.add_done_callback(self._on_end)
        self.refresh()

    def _on_row(self, _row: dict[str, Any]) -> None:
        self.refresh()

    def _on_end(self, _run: Any) -> None:
        self.refresh()

    def refresh(self) -> None:
        """Redraw every part from the run (safe from any thread)."""
        with self._refresh_lock:  # a snapshot and its drawing stay together: the last wins
            self._draw(self.state.snapshot())

    def _draw(self, snap: dict[str, Any]) -> None:
        self.progress.max = max(snap["total"], 1)
        self.progress.value = min(snap["done"], self.progress.max)
        self.counts.value = (f"{snap['done']}/{snap['total']} &nbsp; " + ", ".join(
            f"{escape(k)}: <b>{v}</b>" for k, v in snap["counts"].items()))
        mean = snap["mean_reward"]
        self.mean.value = "mean reward: <b>{}</b>".format(
            "-" if math.isnan(mean) else f"{mean:.3f}")
        self.histogram.value = reward_histogram_svg(snap["rewards"])
        cols = ("task_id", "status", "reward", "duration_s")
        self.newest.value = table_html(
            cols, ([_fmt(r.get(c)) for c in cols] for r in snap["newest"]))
        self.status.value = _status_text(snap, self._cancel_requested)
        if snap["finished"] or self._cancel_requested:
            self.cancel_button.disabled = True
        if snap["finished"]:
            self.progress.bar_style = "success" if snap["status"] == "done" else "warning"

    def _on_cancel(self, *_: Any) -> None:
        self._cancel_requested = True
        self.run.cancel()
        self.refresh()  # "cancelling..." until the run's end redraws it, or its final state

    def close(self) -> None:
        self._unsubscribe()
        self._forget_end()
        super().close()


def _status_text(snap: dict[str, Any], cancel_requested: bool) -> str:
    """One status: the run's final one once it ended, else "cancelling..." after a click."""
    status = snap["status"]
    if cancel_requested and not snap["finished"]:
        status = "cancelling..."
    return f"status: <b>{escape(status)}</b>"


def _fmt(value: Any) -> Any:
    return f"{value:.3g}" if isinstance(value, float) else value
