"""The run monitor's HTML, from a :class:`~sandboxnb.notebook.monitor_state.MonitorState`
snapshot: plain functions of plain data (tests call them directly). Colours are JupyterLab's
theme variables, so the dark theme works."""

from __future__ import annotations

import math
from html import escape
from typing import Any

from sandboxnb.notebook.reprs import FG_DIM, format_age, format_number

__all__ = [
    "STATUS_COLOURS",
    "compact_html",
    "counts_html",
    "header_html",
    "oldest_html",
    "reward_html",
    "rollout_html",
    "row_html",
]

STATUS_COLOURS = {
    "ok": "var(--jp-success-color1,#1a7f37)",
    "error": "var(--jp-error-color1,#cf222e)",
    "timeout": "var(--jp-warn-color1,#bc4c00)",
    "cancelled": FG_DIM,
}
_MONO = "font-family:var(--jp-code-font-family,monospace)"


def _status(status: str, text: str | None = None) -> str:
    colour = STATUS_COLOURS.get(status, "inherit")
    return (f"<span class='sandboxnb-status-{escape(status)}' style='color:{colour};"
            f"font-weight:bold'>{escape(text or status)}</span>")


def _number(value: Any) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return float(value) if ok else math.nan


def _repeat(repeat: Any) -> str:
    return f" #{repeat}" if repeat else ""


def _seconds(value: float) -> str:
    if value != value:  # NaN
        return "-"
    return f"{value:.1f}s" if value < 60 else format_age(value)


def counts_html(counts: dict[str, int]) -> str:
    """``ok 142 · error 13 · timeout 9``, each coloured by status (``no rows yet`` if empty)."""
    if not counts:
        return f"<span style='color:{FG_DIM}'>no rows yet</span>"
    return " &middot; ".join(
        f"<span class='sandboxnb-count sandboxnb-count-{escape(k)}'>"
        f"{_status(k, f'{k} {v}')}</span>" for k, v in counts.items())


def header_html(snap: dict[str, Any]) -> str:
    """Progress at a glance: rows of total, elapsed, rate, ETA, rollouts in flight, status."""
    rate = snap["rate"]
    parts = [
        f"<b>{snap['done']}/{snap['total']}</b>",
        f"elapsed {_seconds(snap['elapsed_s'])}",
        f"{rate:.2f}/s" if rate == rate else "-/s",
        f"ETA {_seconds(snap['eta_s'])}",
        f"<span class='sandboxnb-in-flight'>{snap['in_flight']} in flight</span>",
        f"status <b class='sandboxnb-run-status'>{escape(snap['status'])}</b>",
    ]
    return " &middot; ".join(parts)


def reward_html(snap: dict[str, Any]) -> str:
    """The mean reward with its denominator: over every finished rollout, failures counting 0,
    and over graded rollouts when some failed."""
    if not snap["scored"]:
        return f"mean reward: <span style='color:{FG_DIM}'>no finished rollouts yet</span>"
    text = (f"mean reward <b class='sandboxnb-score'>{snap['score']:.3f}</b> over "
            f"{snap['scored']} rollouts")
    if snap["graded"] < snap["scored"]:
        graded = "-" if math.isnan(snap["mean_reward"]) else f"{snap['mean_reward']:.3f}"
        text += (f" <span style='color:{FG_DIM}'>(errors and timeouts count 0; {graded} over "
                 f"{snap['graded']} graded)</span>")
    return text


def oldest_html(snap: dict[str, Any]) -> str:
    """The rollouts running longest, named with their age (empty when none runs)."""
    if not snap["oldest"]:
        return ""
    items = ", ".join(
        f"<code>{escape(str(r['task_id']))}</code>{_repeat(r.get('repeat'))} "
        f"{_seconds(r['age_s'])}" for r in snap["oldest"])
    return f"<span class='sandboxnb-oldest'>running longest: {items}</span>"


def compact_html(snap: dict[str, Any]) -> str:
    """The one line a finished run collapses to."""
    mark = {"": "&#9679;", "success": "&#10004;", "warning": "&#9888;", "danger": "&#10008;"}
    colour = {"success": STATUS_COLOURS["ok"], "warning": STATUS_COLOURS["timeout"],
              "danger": STATUS_COLOURS["error"]}.get(snap["bar_style"], "inherit")
    score = "-" if not snap["scored"] else f"{snap['score']:.3f} over {snap['scored']}"
    return (f"<span class='sandboxnb-compact'><span style='color:{colour}'>"
            f"{mark.get(snap['bar_style'], '')}</span> <b>{escape(snap['name'])}</b> "
            f"&middot; {escape(snap['status'])} &middot; {snap['done']}/{snap['total']} &middot; "
            f"{counts_html(snap['counts'])} &middot; mean reward {score} &middot; "
            f"{_seconds(snap['elapsed_s'])}</span>")


def cause(row: dict[str, Any]) -> str:
    """A row's one-line cause (its error), empty for a graded row."""
    return str(row.get("error") or "")


def row_html(row: dict[str, Any]) -> str:
    """One table row after its task button: status, reward (as the DataFrame shows it),
    duration and the one-line cause."""
    reason = cause(row)
    short = reason if len(reason) <= 90 else reason[:90] + "..."
    return (f"<span style='{_MONO};font-size:12px;white-space:nowrap'>"
            f"<span style='display:inline-block;width:70px'>"
            f"{_status(str(row.get('status')))}</span>"
            f"<span style='display:inline-block;width:60px'>{format_number(row.get('reward'))}"
            f"</span><span style='display:inline-block;width:60px'>"
            f"{_seconds(_number(row.get('duration_s')))}</span>"
            f"<span title='{escape(reason)}' style='color:{STATUS_COLOURS['error']}'>"
            f"{escape(short)}</span></span>")


def _pre(text: str) -> str:
    return (f"<pre style='{_MONO};font-size:11px;max-height:240px;overflow:auto;margin:2px 0;"
            f"padding:4px;background:var(--jp-layout-color2,#f6f8fa);"
            f"color:var(--jp-content-font-color1,#1f2328)'>{escape(text)}</pre>")


def rollout_html(row: dict[str, Any], task: Any = None) -> str:
    """Everything about one rollout: prompt, answer, grade, error and traceback, output."""
    head = (f"<b>{escape(str(row.get('task_id')))}</b> repeat {row.get('repeat')} &middot; "
            f"{_status(str(row.get('status')))} &middot; reward "
            f"<b>{format_number(row.get('reward'))}</b> &middot; "
            f"{_seconds(_number(row.get('duration_s')))} &middot; sandbox "
            f"<code>{escape(str(row.get('sandbox_id')))}</code>")
    parts = [f"<div class='sandboxnb-rollout'>{head}"]
    prompt = getattr(task, "prompt", None)
    if prompt is not None:
        parts.append(f"<div><b>prompt</b>{_pre(str(prompt))}</div>")
    parts.append(f"<div><b>answer</b>{_pre(str(row.get('answer') or '(none)'))}</div>")
    if row.get("info"):
        parts.append(f"<div><b>grade</b> {escape(str(row.get('info')))}</div>")
    if row.get("error"):
        parts.append(f"<div><b>error</b> ({escape(str(row.get('error_type') or '?'))} during "
                     f"{escape(str(row.get('phase') or '?'))}): "
                     f"<span style='color:{STATUS_COLOURS['error']}'>"
                     f"{escape(str(row.get('error')))}</span></div>")
    if row.get("traceback"):
        parts.append(f"<div><b>traceback</b>{_pre(str(row['traceback']))}</div>")
    if row.get("output_tail"):
        parts.append(f"<div><b>last output in the sandbox</b>{_pre(str(row['output_tail']))}"
                     "</div>")
    return "".join(parts) + "</div>"
