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
import math
import threading
from collections.abc import MutableMapping
from html import escape
from typing import Any

import ipywidgets as w

from sandboxnb.errors import ConfigError
from sandboxnb.notebook.form import FORM_FIELDS, LauncherController
from sandboxnb.notebook.loop import kernel_loop, remember_kernel_loop
from sandboxnb.notebook.monitor_state import MonitorState
from sandboxnb.notebook.reprs import _STATE_COLOURS, format_age, reward_histogram_svg, table_html
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
        self.status = w.HTML("")
        super().__init__([
            w.HBox([self.progress, self.counts]), self.mean,
            w.HBox([self.histogram, self.newest]), w.HBox([self.cancel_button, self.status]),
        ])
        self._unsubscribe = run.subscribe(self._on_row)
        self._forget_end = run.add_done_callback(self._on_end)
        self.refresh()

    def _on_row(self, _row: dict[str, Any]) -> None:
        self.refresh()

    def _on_end(self, _run: Any) -> None:
        self.refresh()

    def refresh(self) -> None:
        """Redraw every part from the run (safe from any thread)."""
        snap = self.state.snapshot()
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
        self.status.value = f"status: <b>{escape(snap['status'])}</b>"
        if snap["finished"]:
            self.cancel_button.disabled = True
            self.progress.bar_style = "success" if snap["status"] == "done" else "warning"

    def _on_cancel(self, *_: Any) -> None:
        self.cancel_button.disabled = True
        self.status.value = "status: <b>cancelling...</b>"
        self.run.cancel()

    def close(self) -> None:
        self._unsubscribe()
        self._forget_end()
        super().close()


def _fmt(value: Any) -> Any:
    return f"{value:.3g}" if isinstance(value, float) else value
