"""HTML and text views of sandboxes, providers and runs. They only read public attributes: never
block, never touch a loop, so they are safe to call from any thread and from display formatters
(see :mod:`sandboxnb.notebook.display`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from html import escape
from typing import Any

__all__ = [
    "ProvidersTable",
    "SandboxTable",
    "format_age",
    "format_number",
    "histogram_svg",
    "provider_rows",
    "providers_html",
    "reward_histogram_svg",
    "run_summary_html",
    "sandbox_html",
    "sandboxes_html",
    "table_html",
    "table_text",
]

_STYLE = (
    "border-collapse:collapse;font-family:var(--jp-code-font-family,monospace);font-size:12px"
)
_CELL = "border:1px solid #ddd;padding:2px 8px;text-align:left"
_STATE_COLOURS = {"running": "#1a7f37", "starting": "#9a6700", "failed": "#cf222e",
                  "stopped": "#57606a", "stopping": "#9a6700"}


def format_age(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h01m``."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def table_html(columns: Sequence[str], rows: Iterable[Sequence[Any]], css_class: str = "") -> str:
    """A small bordered HTML table; every cell is escaped."""
    head = "".join(f"<th style='{_CELL}'>{escape(str(c))}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td style='{_CELL}'>{_cell(v)}</td>" for v in row) + "</tr>"
        for row in rows
    )
    return f"<table class='{css_class}' style='{_STYLE}'><tr>{head}</tr>{body}</table>"


def _cell(value: Any) -> str:
    if isinstance(value, _Raw):
        return value.html
    return escape("" if value is None else str(value))


class _Raw:
    def __init__(self, html: str) -> None:
        self.html = html


def table_text(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain aligned text table."""
    text_rows = [[("" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in text_rows]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    for row in text_rows:
        lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


# ---- sandboxes -----------------------------------------------------------------------------
SANDBOX_COLUMNS = ("name", "provider", "id", "age", "config", "state")


def _sandbox_row(record: Any, html: bool) -> list[Any]:
    row = record.summary()
    state = row["state"] + (f" ({row['error']})" if row["error"] else "")
    if html:
        colour = _STATE_COLOURS.get(row["state"], "inherit")
        state = _Raw(f"<span style='color:{colour}'>{escape(state)}</span>")
    return [row["name"], row["provider"], row["id"], format_age(row["age_s"]), row["config"],
            state]


def sandboxes_html(records: Sequence[Any]) -> str:
    """HTML table of interactive sandboxes (``SandboxRecord``s)."""
    if not records:
        return "<i>no sandboxes running</i> (start one with <code>%sandbox launch</code>)"
    return table_html(SANDBOX_COLUMNS, (_sandbox_row(r, True) for r in records), "sandboxnb-ls")


class SandboxTable:
    """What ``%sandbox ls`` returns: a snapshot with text and HTML reprs; ``.rows`` are dicts."""

    def __init__(self, records: Sequence[Any]) -> None:
        self._records = list(records)
        self.rows = [r.summary() for r in self._records]

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        if not self._records:
            return "no sandboxes running (start one with %sandbox launch)"
        return table_text(SANDBOX_COLUMNS, (_sandbox_row(r, False) for r in self._records))

    def _repr_html_(self) -> str:
        return sandboxes_html(self._records)


# ---- providers -----------------------------------------------------------------------------
PROVIDER_COLUMNS = (
    "provider", "available", "transport", "supports", "why unavailable / how to enable")


def provider_rows() -> list[dict[str, Any]]:
    """One row per registered provider (see :func:`sandboxnb.providers.describe_providers`)."""
    from sandboxnb.providers import describe_providers

    return describe_providers()


def _provider_cells(row: dict[str, Any]) -> list[Any]:
    return [row["provider"], "yes" if row["available"] else "no", row.get("transport", ""),
            row["supports"], row["reason"]]


def providers_html(rows: Sequence[dict[str, Any]]) -> str:
    return table_html(PROVIDER_COLUMNS, (_provider_cells(r) for r in rows), "sandboxnb-providers")


class ProvidersTable:
    """What ``%sandbox providers`` returns; ``.rows`` are dicts."""

    def __init__(self, rows: Sequence[dict[str, Any]]) -> None:
        self.rows = list(rows)

    def __repr__(self) -> str:
        return table_text(PROVIDER_COLUMNS, (_provider_cells(r) for r in self.rows))

    def _repr_html_(self) -> str:
        return providers_html(self.rows)


# ---- client sandboxes ----------------------------------------------------------------------
def sandbox_html(sandbox: Any) -> str:
    """A client :class:`~sandboxnb.client.Sandbox`: state, id, provider, url, config, server."""
    state = "closed" if sandbox.closed else "open"
    colour = _STATE_COLOURS["running" if state == "open" else "stopped"]
    rows = [("id", sandbox.id), ("provider", sandbox.provider or "attached"), ("url", sandbox.url)]
    config = sandbox.config
    if config is not None and hasattr(config, "summary"):
        rows += [(k, v) for k, v in config.summary().items() if v is not None]
    info = getattr(sandbox, "info", None) or {}
    for key in ("python", "pid", "workdir"):
        if key in info:
            rows.append((f"server {key}", info[key]))
    body = "".join(
        f"<tr><th style='text-align:left;padding-right:1em'>{escape(str(k))}</th>"
        f"<td><code>{escape(str(v))}</code></td></tr>" for k, v in rows
    )
    return (f"<div><b>sandboxnb Sandbox</b> <span style='color:{colour}'>&#9679; {state}"
            f"</span><table>{body}</table></div>")


# ---- runs ----------------------------------------------------------------------------------
def run_summary_html(run: Any) -> str:
    """One line for a :class:`~sandboxnb.scheduler.Run`: its name and summary."""
    return f"<b>sandboxnb run</b> <code>{escape(run.name)}</code>: {escape(run.summary())}"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


#: JupyterLab theme colours (with light-theme fallbacks outside JupyterLab)
FG = "var(--jp-ui-font-color1,#1f2328)"
FG_DIM = "var(--jp-ui-font-color2,#57606a)"
BAR = "var(--jp-brand-color1,#1976d2)"
LINE = "var(--jp-border-color2,#d0d7de)"


def format_number(value: float, digits: int = 4) -> str:
    """A float as a DataFrame shows it: ``1.0``, ``0.75``, ``0.3333``; ``-`` for NaN/None."""
    if not _is_number(value):
        return "-"
    text = f"{float(value):.{digits}f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def histogram_svg(values: Sequence[float], *, title: str, bins: int = 10,
                  lo: float | None = None, hi: float | None = None, unit: str = "",
                  width: int = 300, height: int = 120, css_class: str = "sandboxnb-hist") -> str:
    """An inline SVG histogram with a title, the count on each bar and the axis range; an empty
    one says ``no rows yet``. Colours come from JupyterLab's theme variables."""
    values = [float(v) for v in values if _is_number(v)]
    text = f"style='fill:{FG}' font-size='11' font-family='var(--jp-ui-font-family,sans-serif)'"
    head = f"<text x='0' y='12' {text} font-weight='bold'>{escape(title)} (n={len(values)})</text>"
    if not values:
        body = (f"<text x='{width / 2:.0f}' y='{height / 2 + 8:.0f}' text-anchor='middle' "
                f"{text} style='fill:{FG_DIM}'>no rows yet</text>")
        return (f"<svg class='{css_class}' width='{width}' height='{height}' "
                f"xmlns='http://www.w3.org/2000/svg'>{head}{body}</svg>")
    lo = min(values) if lo is None else lo
    hi = max(values) if hi is None else hi
    span = (hi - lo) or 1.0
    counts = [0] * bins
    for value in values:
        counts[min(bins - 1, max(0, int((value - lo) / span * bins)))] += 1
    top = max(counts) or 1
    plot_top, plot_bottom = 30, height - 16
    bar_w = width / bins
    bars = []
    for i, n in enumerate(counts):
        h = (plot_bottom - plot_top) * n / top
        x, y = i * bar_w, plot_bottom - h
        a, b = lo + span * i / bins, lo + span * (i + 1) / bins
        bars.append(
            f"<rect x='{x + 1:.1f}' y='{y:.1f}' width='{bar_w - 2:.1f}' height='{h:.1f}' "
            f"style='fill:{BAR}'><title>{format_number(a, 2)}-{format_number(b, 2)}{unit}: "
            f"{n}</title></rect>"
        )
        if n:
            bars.append(f"<text x='{x + bar_w / 2:.1f}' y='{y - 3:.1f}' text-anchor='middle' "
                        f"{text}>{n}</text>")
    axis = (f"<line x1='0' y1='{plot_bottom + 0.5}' x2='{width}' y2='{plot_bottom + 0.5}' "
            f"style='stroke:{LINE}'/>"
            f"<text x='0' y='{height - 3}' {text}>{format_number(lo, 2)}{unit}</text>"
            f"<text x='{width}' y='{height - 3}' text-anchor='end' {text}>"
            f"{format_number(hi, 2)}{unit}</text>")
    return (f"<svg class='{css_class}' width='{width}' height='{height}' "
            f"xmlns='http://www.w3.org/2000/svg'>{head}{''.join(bars)}{axis}</svg>")


def reward_histogram_svg(rewards: Sequence[float], bins: int = 10, width: int = 300,
                         height: int = 120) -> str:
    """The reward histogram: rewards in [0, 1] (values outside are clamped)."""
    return histogram_svg(rewards, title="reward", bins=bins, lo=0.0, hi=1.0, width=width,
                         height=height, css_class="sandboxnb-hist sandboxnb-hist-reward")
