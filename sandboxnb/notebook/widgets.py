"""Thin ipywidgets views over :mod:`sandboxnb.notebook.form` (launcher) and
:mod:`sandboxnb.notebook.monitor_state` (run monitor).

Callbacks may run on another thread (JupyterLab >= 4.4 routes comm messages through kernel
subshells), so they never block and never touch asyncio objects directly: launching and stopping
go through the sandbox manager, which hands the work to the kernel loop with
``call_soon_threadsafe``; cancelling a run goes through ``Run.cancel`` (thread-safe). Updates
arrive on the kernel loop thread; they only set widget traits.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import MutableMapping
from html import escape
from typing import Any

import ipywidgets as w

from sandboxnb.errors import ConfigError
from sandboxnb.notebook.form import FORM_FIELDS, LauncherController
from sandboxnb.notebook.loop import kernel_loop, remember_kernel_loop
from sandboxnb.notebook.monitor_html import (
    STATUS_COLOURS,
    compact_html,
    counts_html,
    header_html,
    oldest_html,
    reward_html,
    rollout_html,
    row_html,
)
from sandboxnb.notebook.monitor_state import MonitorState
from sandboxnb.notebook.reprs import (
    _STATE_COLOURS,
    format_age,
    histogram_svg,
    reward_histogram_svg,
)
from sandboxnb.options import OPTIONS, Option

__all__ = ["Launcher", "Monitor"]

_ERR = "<span style='color:var(--jp-error-color1,#cf222e)'>{}</span>"
_NOTE = "<span style='color:var(--jp-ui-font-color2,#57606a)'>{}</span>"
_LABEL = w.Layout(width="130px", min_width="130px")
#: Launcher table columns and their widths.
_COLUMNS = (("name", "90px"), ("provider", "70px"), ("id", "170px"), ("age", "60px"),
            ("config", "240px"), ("state", "260px"))
#: Seconds between two updates of the ages in the launcher's table.
AGE_TICK_S = 1.0


def _row(label: str, widget: w.Widget, error: w.HTML, css: str = "") -> w.HBox:
    widget.layout.width = widget.layout.min_width = "300px"  # fixed; the notes take the rest
    error.layout.flex, error.layout.margin = "1 1 auto", "0 0 0 8px"
    row = w.HBox([w.Label(label, layout=_LABEL), widget, error])
    if css:
        row.add_class(css)
    return row


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
    option name; an empty field leaves the option to its default, ``none`` sets it to None. A
    field the chosen provider does not honour is disabled, with the reason beside it.
    ``defaults`` pre-fill the provider, the name and any field (``cpu=1, memory_mb=512``).
    A launched sandbox's handle lands in ``namespace`` (default: the notebook's) under its name.
    """

    def __init__(self, controller: LauncherController | None = None, *,
                 namespace: MutableMapping[str, Any] | None = None, **defaults: Any) -> None:
        unknown = sorted(set(defaults) - set(FORM_FIELDS))
        if unknown:
            raise ConfigError(
                f"launcher({', '.join(unknown)}=...): not a launcher field; accepted: "
                f"{', '.join(FORM_FIELDS)}"
            )
        remember_kernel_loop()  # built in a cell: the loop running here is the kernel's
        self.controller = controller or LauncherController()
        self.namespace = namespace if namespace is not None else _user_namespace()
        options = []
        for row in self.controller.providers:
            label = row["provider"] if row["available"] else f"{row['provider']} (unavailable)"
            options.append((label, row["provider"]))
        available = [r["provider"] for r in self.controller.providers if r["available"]]
        first = defaults.get("provider") or (available[0] if available else options[0][1])
        self.provider = w.Dropdown(options=options, value=first)
        self.name_field = w.Text(value=_text(defaults.get("name")),
                           placeholder="sb1, sb2, ... (automatic)",
                           tooltip="the sandbox's name and its variable in the notebook")
        self.fields: dict[str, w.Text] = {
            opt.name: w.Text(value=_text(defaults.get(opt.name)), placeholder=_placeholder(opt),
                             tooltip=f"{opt.flag}: {opt.help}")
            for opt in OPTIONS
        }
        self.errors = {name: w.HTML("") for name in FORM_FIELDS}
        self.launch_button = w.Button(description="Launch", button_style="primary", icon="play")
        self.launch_button.add_class("sandboxnb-launch")
        self.status = w.HTML("")
        self.status.add_class("sandboxnb-status")
        self.table = w.VBox([])
        self.table.add_class("sandboxnb-table")
        self.launch_button.on_click(self._on_launch)
        self.provider.observe(self._on_provider, names="value")
        self._lock = threading.Lock()
        self._last: Any = None
        self._ages: dict[str, tuple[Any, w.Label]] = {}
        self._ticking = False
        self._closed = False
        form = [
            _row("provider", self.provider, self.errors["provider"]),
            _row("name", self.name_field, self.errors["name"]),
            *(_row(name, field, self.errors[name], css=f"sandboxnb-field-{name}")
              for name, field in self.fields.items()),
        ]
        super().__init__([*form, w.HBox([self.launch_button, self.status]), self.table])
        self.add_class("sandboxnb-launcher")
        self._on_provider()
        self._unsubscribe = self.controller.manager.subscribe(self.refresh)
        self.refresh()

    # ---- form --------------------------------------------------------------------------
    def values(self) -> dict[str, Any]:
        """``{form field: value}``: the provider, the name and the text of every option field
        the provider honours (disabled fields are left out)."""
        return {"provider": self.provider.value, "name": self.name_field.value,
                **{name: field.value for name, field in self.fields.items()
                   if not field.disabled}}

    def _on_provider(self, *_: Any) -> None:
        info = self.controller.provider_info(self.provider.value) or {}
        if info and not info["available"]:
            self.errors["provider"].value = _ERR.format(escape(f"unavailable: {info['reason']}"))
            self.launch_button.disabled = True
        else:
            self.errors["provider"].value = _NOTE.format(
                escape(info.get("description") or info.get("supports", "")))
            self.launch_button.disabled = False
        unsupported = self.controller.unsupported(self.provider.value)
        for name, field in self.fields.items():
            field.disabled = name in unsupported
            self.errors[name].value = (_NOTE.format(escape(unsupported[name]))
                                       if name in unsupported else "")

    def show_errors(self, errors: dict[str, str]) -> None:
        unsupported = self.controller.unsupported(self.provider.value)
        for name, html in self.errors.items():
            if name == "provider" and name not in errors:
                continue
            if name in errors:
                html.value = _ERR.format(escape(errors[name]))
            elif name in unsupported:
                html.value = _NOTE.format(escape(unsupported[name]))
            else:
                html.value = ""

    def _on_launch(self, *_: Any) -> None:
        errors = self.controller.validate(self.values())
        self.show_errors(errors)
        if errors:
            self.status.value = _ERR.format("fix the highlighted fields; nothing was started")
            return
        name = self.name_field.value.strip()
        existing = self.controller.manager.get(name) if name else None
        try:
            record = self.controller.launch(self.values(), namespace=self.namespace)
        except Exception as err:  # a race with another launch, or a provider error
            self.status.value = _ERR.format(escape(str(err)))
            return
        reused = record is existing
        self._last = record
        self.status.value = (f"<b>{escape(record.name)}</b> is already running with this "
                             "configuration: reused it" if reused
                             else f"starting <b>{escape(record.name)}</b>...")
        if not reused:
            self.refresh()

    def _usage(self, name: str) -> str:
        where = "" if self.namespace is not None else " (not in a notebook: no variable)"
        examples = [f'await {name}.exec("ls")', f'await {name}.python("1 + 1")',
                    f"%%sandbox {name}", f"%sandbox stop {name}"]
        code = [f"<code>{escape(text)}</code>" for text in examples]
        return (f"<b>{escape(name)}</b> is running{where}. Use it: {code[0]}, {code[1]}, or a "
                f"cell starting with {code[2]}. Stop it here or with {code[3]}.")

    # ---- table -------------------------------------------------------------------------
    def refresh(self) -> None:
        """Rebuild the table from the manager (safe from any thread)."""
        with self._lock:
            records = self.controller.manager.records()
            self._ages = {}
            rows = [self._table_row(r) for r in records]
            if rows:
                self.table.children = [self._header(), *rows]
            else:
                empty = w.HTML("<i>no sandboxes running</i>")
                self.table.children = [empty]
            last = self._last
            if last is not None:
                if last.state == "running":
                    self.status.value = self._usage(last.name)
                elif last.state == "failed":
                    self.status.value = _ERR.format(
                        escape(f"{last.name} failed to start: {last.error}"))
                elif last.state == "ended":
                    self.status.value = _ERR.format(escape(f"{last.name} ended: {last.error}"))
        if rows:
            self._start_ticking()

    @staticmethod
    def _header() -> w.HBox:
        cells = [w.HTML(f"<b>{title}</b>", layout=w.Layout(width=width))
                 for title, width in _COLUMNS]
        header = w.HBox(cells)
        header.add_class("sandboxnb-header")
        return header

    def _table_row(self, record: Any) -> w.HBox:
        info = record.summary()
        widths = dict(_COLUMNS)
        state = info["state"] + (f": {info['error']}" if info["error"] else "")
        colour = _STATE_COLOURS.get(info["state"], "inherit")
        age = w.Label(format_age(info["age_s"]), layout=w.Layout(width=widths["age"]))
        cells = [
            w.HTML(f"<b>{escape(info['name'])}</b>", layout=w.Layout(width=widths["name"])),
            w.Label(info["provider"], layout=w.Layout(width=widths["provider"])),
            w.Label(info["id"], layout=w.Layout(width=widths["id"])),
            age,
            w.Label(info["config"], layout=w.Layout(width=widths["config"])),
            w.HTML(f"<span style='color:{colour}' title='{escape(state)}'>{escape(state)}"
                   "</span>", layout=w.Layout(width=widths["state"])),
        ]
        if record.state in ("starting", "running"):
            self._ages[record.name] = (record, age)
        ended = record.state == "ended"
        stop = w.Button(description="Remove" if ended else "Stop",
                        icon="times" if ended else "stop",
                        button_style="" if ended else "danger",
                        tooltip=f"{'remove' if ended else 'stop'} {info['name']}",
                        layout=w.Layout(width="90px"))
        stop.add_class("sandboxnb-stop")
        stop.on_click(lambda _b, name=record.name: self.controller.stop(name))
        row = w.HBox([*cells, stop])
        row.add_class("sandboxnb-row")
        row.add_class(f"sandboxnb-row-{record.name}")
        return row

    # ---- live ages ----------------------------------------------------------------------
    def _start_ticking(self) -> None:
        if self._ticking or self._closed:
            return
        self._ticking = True
        try:
            kernel_loop().call_soon_threadsafe(self._tick)
        except RuntimeError:  # no usable loop: ages update on the next change only
            self._ticking = False

    def _tick(self) -> None:
        """Every second on the kernel loop while sandboxes are listed: update their ages."""
        with self._lock:
            ages = list(self._ages.values())
        if self._closed or not ages:
            self._ticking = False
            return
        for record, label in ages:
            label.value = format_age(record.age_s)
        asyncio.get_running_loop().call_later(AGE_TICK_S, self._tick)

    def close(self) -> None:
        self._closed = True
        unsubscribe = getattr(self, "_unsubscribe", None)  # None: refused in __init__
        if unsubscribe is not None:
            unsubscribe()
        super().close()


def _user_namespace() -> MutableMapping[str, Any] | None:
    """The running IPython shell's user namespace, if there is a shell."""
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    shell = get_ipython()
    return shell.user_ns if shell is not None else None


class _RowView:
    """One clickable row of a monitor table: the task's button (opens the rollout) and the
    row's cells. A fixed pool of these is re-filled on each refresh (no widget churn)."""

    def __init__(self, on_open: Any) -> None:
        self.row: dict[str, Any] | None = None
        self.button = w.Button(layout=w.Layout(width="180px"), tooltip="open this rollout")
        self.button.add_class("sandboxnb-open")
        self.cells = w.HTML("")
        self.box = w.HBox([self.button, self.cells], layout=w.Layout(display="none"))
        self.box.add_class("sandboxnb-run-row")
        self.button.on_click(lambda _b: on_open(self.row) if self.row is not None else None)

    def show(self, row: dict[str, Any] | None) -> None:
        self.row = row
        if row is None:
            self.box.layout.display = "none"
            return
        repeat = row.get("repeat")
        self.button.description = f"{row.get('task_id')}" + (f" #{repeat}" if repeat else "")
        self.cells.value = row_html(row)
        self.box.layout.display = ""


class Monitor(w.VBox):
    """Live view of a Run: progress bar (red with errors, orange with timeouts, green only when
    every rollout was graded), elapsed, rate, ETA, rollouts in flight and the oldest running,
    counts by status in colour, the mean reward with its denominator, reward and duration
    histograms, the latest errors and newest rows (click one to open that rollout) and a Cancel
    button. A finished run collapses to one line (``details`` expands it). Fed by
    ``run.subscribe`` (rows arrive on the run's loop) and a tick each second while it runs."""

    TICK_S = 1.0

    def __init__(self, run: Any) -> None:
        self.run = run
        self.state = MonitorState(run)
        self._lock = threading.RLock()
        self._closed = False
        self._cancel_requested = False
        self._tick_task: Any = None
        self.progress = w.IntProgress(value=0, min=0, max=max(int(run.total or 0), 1),
                                      description="rollouts")
        self.header = w.HTML("")
        self.counts = w.HTML("")
        self.mean = w.HTML("")
        self.oldest = w.HTML("")
        self.histogram = w.HTML("")
        self.durations = w.HTML("")
        self.error_rows = [_RowView(self.open_rollout) for _ in range(self.state.errors)]
        self.newest_rows = [_RowView(self.open_rollout) for _ in range(self.state.newest)]
        self.errors_title = w.HTML("")
        self.newest_title = w.HTML("<b>newest rows</b> <small>(click one to open it)</small>")
        self.detail = w.HTML("")
        self.detail.add_class("sandboxnb-detail")
        self.close_detail = w.Button(description="close", icon="times",
                                     layout=w.Layout(width="80px"))
        self.close_detail.on_click(lambda _b: self.show_rollout(None))
        self.detail_box = w.VBox([self.close_detail, self.detail],
                                 layout=w.Layout(display="none"))
        self.cancel_button = w.Button(description="Cancel", icon="stop", button_style="warning")
        self.cancel_button.on_click(self._on_cancel)
        self.cancel_button.add_class("sandboxnb-cancel")
        self.status = w.HTML("")
        self.compact = w.HTML("")
        self.compact.add_class("sandboxnb-compact-line")
        self.expand = w.ToggleButton(value=False, description="details", icon="chevron-down",
                                     layout=w.Layout(width="100px", display="none"))
        self.expand.observe(lambda _c: self._show_body(), names="value")
        self.body = w.VBox([
            w.HBox([self.progress, self.header]), self.counts, self.mean, self.oldest,
            w.HBox([self.histogram, self.durations]),
            self.errors_title, *(r.box for r in self.error_rows),
            self.newest_title, *(r.box for r in self.newest_rows),
            self.detail_box, w.HBox([self.cancel_button, self.status]),
        ])
        super().__init__([w.HBox([self.compact, self.expand]), self.body])
        self.add_class("sandboxnb-monitor")
        self._unsubscribe = run.subscribe(self._on_row)
        self._forget_end = run.add_done_callback(self._on_end)
        self.refresh()
        self._start_ticker()

    # ---- updates -------------------------------------------------------------------------
    def _on_row(self, _row: dict[str, Any]) -> None:
        self.refresh()

    def _on_end(self, _run: Any) -> None:
        self.refresh()

    def _start_ticker(self) -> None:
        """Refresh each second while the run runs (ages, elapsed and ETA move without rows)."""
        loop = getattr(self.run, "loop", None)
        if loop is None or self.run.done():
            return

        def begin() -> None:
            if not self._closed:
                self._tick_task = loop.create_task(self._tick())

        try:
            loop.call_soon_threadsafe(begin)
        except RuntimeError:  # the loop is closed
            pass

    async def _tick(self) -> None:
        while not self._closed and not self.run.done():
            await asyncio.sleep(self.TICK_S)
            self.refresh()

    def refresh(self) -> None:
        """Redraw every part from the run (safe from any thread)."""
        with self._lock:
            snap = self.state.snapshot()
            self.snapshot = snap
            self.progress.max = max(snap["total"], 1)
            self.progress.value = min(snap["done"], self.progress.max)
            self.progress.bar_style = snap["bar_style"]
            self.header.value = header_html(snap)
            self.counts.value = counts_html(snap["counts"])
            self.mean.value = reward_html(snap)
            self.oldest.value = oldest_html(snap)
            self.histogram.value = reward_histogram_svg(snap["rewards"])
            self.durations.value = histogram_svg(
                snap["durations"], title="duration", lo=0.0, unit="s",
                css_class="sandboxnb-hist sandboxnb-hist-duration")
            errors = snap["errors"]
            self.errors_title.value = (
                f"<b style='color:{STATUS_COLOURS['error']}'>latest errors</b> "
                f"<small>({snap['failed']} failed; click one to open it)</small>"
                if errors else "")
            for view, row in zip(self.error_rows, errors + [None] * len(self.error_rows),
                                 strict=False):
                view.show(row)
            for view, row in zip(self.newest_rows,
                                 snap["newest"] + [None] * len(self.newest_rows), strict=False):
                view.show(row)
            self.status.value = _status_text(snap, self._cancel_requested)
            self.compact.value = compact_html(snap)
            if snap["finished"] or self._cancel_requested:
                self.cancel_button.disabled = True
            self._show_body()

    def _show_body(self) -> None:
        """Running: the whole monitor. Ended: one line, the rest behind ``details``."""
        ended = bool(getattr(self, "snapshot", {}).get("finished"))
        self.compact.layout.display = "" if ended else "none"
        self.expand.layout.display = "" if ended else "none"
        self.body.layout.display = "" if (not ended or self.expand.value) else "none"
        self.expand.description = "hide" if self.expand.value else "details"
        self.expand.icon = "chevron-up" if self.expand.value else "chevron-down"

    # ---- one rollout ---------------------------------------------------------------------
    def open_rollout(self, row: dict[str, Any]) -> None:
        """Show everything about ``row``'s rollout below the tables."""
        self.show_rollout(row)

    def show_rollout(self, row: dict[str, Any] | None) -> None:
        if row is None:
            self.detail.value = ""
            self.detail_box.layout.display = "none"
            return
        task = self.run.task(row.get("task_id")) if hasattr(self.run, "task") else None
        self.detail.value = rollout_html(row, task)
        self.detail_box.layout.display = ""

    def _on_cancel(self, *_: Any) -> None:
        self._cancel_requested = True
        self.run.cancel()
        self.refresh()  # "cancelling..." until the run's end redraws it, or its final state

    def close(self) -> None:
        self._closed = True
        self._unsubscribe()
        self._forget_end()
        task = self._tick_task
        if task is not None and not task.done():
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing ticks
                task.get_loop().call_soon_threadsafe(task.cancel)
        super().close()


def _status_text(snap: dict[str, Any], cancel_requested: bool) -> str:
    """One status: the run's final one once it ended, else "cancelling..." after a click."""
    status = snap["status"]
    if cancel_requested and not snap["finished"]:
        status = "cancelling..."
    return f"status: <b>{escape(status)}</b>"
