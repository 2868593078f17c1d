"""Command line: ``sandboxnb run``, ``providers``, ``doctor`` and ``gc``, thin over the Python API.

The runtime options of ``sandboxnb run`` (``--cpu``, ``--run-timeout``, ...) come from
:mod:`sandboxnb.options`, the table the magics and the launcher widget use too.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
from collections.abc import Coroutine, Sequence
from typing import Any

from sandboxnb import options
from sandboxnb.errors import ConfigError

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors add a did-you-mean for unknown flags and commands."""

    def error(self, message: str):  # type: ignore[override]
        super().error(options.explain_usage_error(self, message))


def _journal_arg(text: str) -> str | None:
    """``--journal``: a path, ``auto`` or ``none`` (no journal; ``./none`` is a file)."""
    return None if text.strip().lower() == "none" else text


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sandboxnb", description="Run agent evaluations in isolated sandboxes."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)

    run = sub.add_parser("run", help="run a taskset with an agent, one fresh sandbox per rollout")
    run.add_argument("taskset", help="'humaneval' or a path to a .json/.jsonl taskset")
    run.add_argument("--agent", required=True, help="'oracle', 'samples:PATH' or 'module:function'")
    run.add_argument("--tasks", help="only task ids matching these globs (comma-separated)")
    run.add_argument("--limit", type=options.count_type("--limit", None), metavar="N",
                     help="only the first N tasks (after --tasks)")
    run.add_argument("--runtime", default="local", help="provider name (default: local)")
    run.add_argument("--max-concurrent", type=options.count_type("--max-concurrent"),
                     default=8, metavar="N", help="sandboxes at once (default 8)")
    run.add_argument("--repeats", type=options.count_type("--repeats"), default=1, metavar="N",
                     help="rollouts per task (default 1)")
    options.add_rollout_timeout(run)
    run.add_argument("--pool", type=options.count_type("--pool", 1000), metavar="N",
                     help="keep N fresh sandboxes ready (a warm pool; each rollout still gets "
                          "its own sandbox, released after it); 1 to 1000")
    run.add_argument(
        "--journal",
        default="auto",
        type=_journal_arg,
        metavar="PATH",
        help="JSONL file that receives each row as it finishes (default: a new file in ./runs); "
             "none: no journal",
    )
    run.add_argument("--resume", action="store_true",
                     help="continue an existing journal: run only the rollouts it lacks; the run "
                          "may grow it (more tasks or more repeats), anything else differing "
                          "from its header needs --force-resume; one run writes a journal at a "
                          "time")
    run.add_argument("--force-resume", action="store_true",
                     help="continue an existing journal even though its header shows another "
                          "run (edited tasks, another taskset name, agent, runtime or config); "
                          "a journal holding rollouts this run would never make (tasks it lacks, "
                          "repeats beyond --repeats) is refused even so")
    run.add_argument("--output", "-o", help="write all rows to .jsonl, .csv or .parquet")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    options.add_runtime_arguments(run)

    sub.add_parser("providers", help="list providers: installed, configured, what each supports")

    doctor = sub.add_parser(
        "doctor", help="live check of a provider: create, exec, files, limits, teardown, latency"
    )
    doctor.add_argument("provider", help="provider name (see `sandboxnb providers`)")
    options.add_runtime_arguments(doctor)

    gc = sub.add_parser(
        "gc", help="find (and with --delete, release) this user's sandboxes left on a backend"
    )
    gc.add_argument("--runtime", action="append", help="provider(s) to check (default: all "
                    "available ones)")
    gc.add_argument("--delete", action="store_true",
                    help="release the ones whose owner process is gone")
    gc.add_argument("--include-live", action="store_true",
                    help="also those whose owner process still runs on this host (a live "
                         "notebook or run of yours)")
    return parser


def _providers_table() -> str:
    from sandboxnb.providers import describe_providers

    lines = [f"{'provider':<10} {'status':<12} transport / supports / reason"]
    for row in describe_providers():
        status = "available" if row["available"] else "unavailable"
        detail = row["supports"] if row["available"] else f"{row['reason']} | {row['supports']}"
        via = f"via {row['transport']} | " if row["transport"] else ""
        lines.append(f"{row['provider']:<10} {status:<12} {via}{detail}")
    return "\n".join(lines)


async def _gc_command(args: argparse.Namespace) -> int:
    from sandboxnb.providers import describe_providers, get_provider
    from sandboxnb.providers.spec import owner_alive

    rows = {row["provider"]: row for row in describe_providers()}
    names = args.runtime or [name for name, row in rows.items() if row["available"]]
    for name in names:
        if name not in rows:
            raise ConfigError(f"--runtime {name!r}: not a known provider; accepted: "
                              f"{', '.join(rows)}")
        if not rows[name]["available"]:
            raise ConfigError(f"--runtime {name!r} is unavailable: {rows[name]['reason']}")
    found_any = False
    for name in names:
        provider = get_provider(name)
        try:
            found = await provider.list_sandboxes(provider.owner_labels())
            live = [f for f in found if owner_alive(f.labels)]
            chosen = found if args.include_live else [f for f in found if f not in live]
            if args.delete:
                await asyncio.gather(*(provider.destroy(f.handle) for f in chosen))
        finally:
            await provider.aclose()
        found_any = found_any or bool(chosen)
        ids = [f.sandbox_id for f in chosen]
        verb = "released" if args.delete else "found"
        print(f"{name}: {verb} {len(ids)} sandbox(es)" + (f": {', '.join(ids)}" if ids else ""))
        if live and not args.include_live:
            pids = sorted({f.labels.get("sandboxnb.pid", "?") for f in live})
            print(f"{name}: {len(live)} more in use by running process(es) {', '.join(pids)} "
                  "(left alone; --include-live takes them too)")
    if found_any and not args.delete:
        print("run `sandboxnb gc --delete` to release them")
    return 0


async def _doctor_command(args: argparse.Namespace) -> int:
    from sandboxnb.doctor import doctor

    report = await doctor(args.provider, options.config_from_options(options.given(args)))
    print(report.text())
    return 0 if report.ok else 1


async def _run_command(args: argparse.Namespace) -> int:
    from sandboxnb.scheduler import run
    from sandboxnb.tasks import Taskset

    config = options.config_from_options(options.given(args))
    if args.output:
        _check_output(args.output)
    _check_available(args.runtime)
    taskset = Taskset.load(args.taskset)
    if args.tasks is not None:
        taskset = taskset.select(options.parse_globs(args.tasks, "--tasks"))
    if args.limit is not None:
        taskset = Taskset(list(taskset)[: args.limit], name=taskset.name)
    result = await run(
        taskset,
        args.agent,
        args.runtime,
        config=config,
        max_concurrent=args.max_concurrent,
        repeats=args.repeats,
        timeout_s=args.rollout_timeout_s,
        journal=args.journal,
        resume="force" if args.force_resume else args.resume,
        progress=not args.no_progress,
        pool=args.pool,
    )
    if args.output:
        path = result.results.write(args.output)
        print(f"wrote {len(result.results)} rows to {path}")
    if result.journal_path:
        print(f"journal: {result.journal_path}")
    print(result.summary())
    return 0


def _check_output(path: str) -> None:
    """The results file must be new, with a known extension, in a folder we can write: it is
    written when the run ends, so every problem is found now, before anything starts."""
    suffix = path.rsplit(".", 1)[-1].lower() if "." in os.path.basename(path) else ""
    if suffix not in ("jsonl", "csv", "parquet"):
        raise ConfigError(
            f"--output {path!r}: unsupported extension {('.' + suffix) if suffix else '(none)'}; "
            "use .jsonl, .csv or .parquet"
        )
    if os.path.lexists(path):
        what = "a directory" if os.path.isdir(path) else "an existing file"
        raise ConfigError(f"--output {path!r} is {what}; expected a new file (results are "
                          "never written over something): choose another path")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise ConfigError(f"--output {path!r}: its folder {folder!r} is not writable "
                          f"({err.strerror}); expected a path in a writable folder (results "
                          "are written there when the run ends)") from None


def _check_available(runtime: str) -> None:
    """A provider that cannot work here is refused before a single rollout is attempted (only
    the chosen one is asked: importing every provider's SDK would slow every run)."""
    from sandboxnb.providers import provider_class

    status = provider_class(runtime).availability()
    if not status.available:
        raise ConfigError(f"--runtime {runtime!r} is unavailable here: {status.reason}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sandboxnb`` command."""
    args = _build_parser().parse_args(argv)
    if args.command == "providers":
        print(_providers_table())
        return 0
    from sandboxnb.agents import AgentError
    from sandboxnb.tasks import TaskError

    commands = {"gc": _gc_command, "doctor": _doctor_command, "run": _run_command}
    command = commands[args.command]
    try:
        return asyncio.run(_until_signalled(command(args)))
    except (
        ConfigError,
        TaskError,
        AgentError,
        ValueError,
        FileExistsError,
        FileNotFoundError,
    ) as err:
        print(f"sandboxnb: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the loop took SIGINT over: nothing had started
        print("sandboxnb: interrupted", file=sys.stderr)
        return 130


async def _until_signalled(command: Coroutine[Any, Any, int]) -> int:
    """Run ``command``; the first SIGINT or SIGTERM cancels it, and every sandbox is released
    before we return. Further signals do not cut the release short (that is what leaked
    sandboxes), they only say what is going on."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(command)
    received: list[str] = []

    def stop(name: str) -> None:
        received.append(name)
        if len(received) == 1:
            print(f"sandboxnb: {name}: stopping; releasing every sandbox...", file=sys.stderr)
            task.cancel()
        else:
            print("sandboxnb: still releasing sandboxes; they are all released before exit "
                  "(SIGKILL would leave them to `sandboxnb gc`)", file=sys.stderr)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop, sig.name)
    try:
        return await task
    except asyncio.CancelledError:
        if not received:
            raise
        print("sandboxnb: interrupted; sandboxes released (a release that failed is logged "
              "above, and `sandboxnb gc` finds what it left)", file=sys.stderr)
        return 130
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


if __name__ == "__main__":
    sys.exit(main())
