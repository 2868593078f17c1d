"""``%sandbox`` (launch, ls, stop, providers, run) and ``%%sandbox`` (run a cell in a sandbox).

Magics are synchronous: each one runs its coroutine as a task on the kernel's own loop and blocks
like a normal cell (:func:`sandboxnb.notebook.loop.run_blocking`), printing streamed output from
the magic's frame so it lands in the running cell. Kernel > Interrupt cancels the remote work.
"""

from __future__ import annotations

import argparse
import queue
import shlex
import sys
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import MagicArgumentParser
from traitlets import Float, Int, TraitType, Unicode
from traitlets.config import Configurable

from sandboxnb import options
from sandboxnb.errors import ConfigError, SandboxnbError
from sandboxnb.notebook.handle import SandboxHandle
from sandboxnb.notebook.loop import Interrupted, remember_kernel_loop, run_blocking
from sandboxnb.notebook.reprs import ProvidersTable, SandboxTable, format_age, provider_rows
from sandboxnb.notebook.sandboxes import SandboxManager, manager, validate_launch

__all__ = ["RemoteCellError", "RemoteValue", "SandboxMagics"]


class _Parser(MagicArgumentParser):
    """MagicArgumentParser whose errors show the usage line and where to read more."""

    def error(self, message: str):
        message = options.explain_usage_error(self, message)
        raise UsageError(f"{self.prog}: {message}\n{self.plain_usage()}\n"
                         "(see %sandbox? for every subcommand and option)")

    def plain_usage(self) -> str:
        """``usage: %sandbox ...`` as typed (IPython's formatter adds reST and a second %)."""
        formatter = argparse.HelpFormatter(prog=self.prog)
        formatter.add_usage(self.usage, self._actions, self._mutually_exclusive_groups)
        return formatter.format_help().strip()


def _line_parser() -> _Parser:
    parser = _Parser(prog="%sandbox", description="Manage sandboxes from a notebook.")
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", parser_class=_Parser)
    launch = sub.add_parser("launch", prog="%sandbox launch",
                            help="start an interactive sandbox, kept until stopped")
    launch.add_argument("provider", nargs="?", help="provider name (default: the configured one)")
    launch.add_argument("--name", help="variable and sandbox name (default sb1, sb2, ...); a "
                        "sandbox of that name running with the same configuration is reused")
    launch.add_argument("--replace", action="store_true",
                        help="stop a sandbox of that name (whatever its configuration) and "
                             "launch a new one")
    options.add_runtime_arguments(launch)
    sub.add_parser("ls", prog="%sandbox ls", help="table of interactive sandboxes")
    stop = sub.add_parser("stop", prog="%sandbox stop", help="stop one sandbox, or --all")
    stop.add_argument("name", nargs="?", help="sandbox name")
    stop.add_argument("--all", action="store_true", help="stop every interactive sandbox")
    sub.add_parser("providers", prog="%sandbox providers",
                   help="installed providers, what they support, why one is unavailable")
    doctor = sub.add_parser("doctor", prog="%sandbox doctor",
                            help="live check of a provider: create, exec, files, limits, teardown")
    doctor.add_argument("provider", nargs="?", help="provider name (default: the configured one)")
    options.add_runtime_arguments(doctor)
    run = sub.add_parser("run", prog="%sandbox run", help="run a taskset with an agent")
    run.add_argument("taskset", help="'humaneval', a .json/.jsonl path or a variable name")
    run.add_argument("--agent", required=True,
                     help="'oracle', 'samples:PATH', 'module:function' or a variable name")
    run.add_argument("--runtime", help="provider name (default: the configured one)")
    run.add_argument("--max-concurrent", type=options.count_type("--max-concurrent"),
                     dest="max_concurrent", default=None, metavar="N")
    run.add_argument("--repeats", type=options.count_type("--repeats"), default=1, metavar="N")
    run.add_argument("--tasks", help="only task ids matching these globs (comma-separated)")
    run.add_argument("--limit", type=options.count_type("--limit", None), metavar="N",
                     help="only the first N tasks (after --tasks)")
    options.add_rollout_timeout(run)
    run.add_argument("--journal", help="JSONL file that receives every row as it finishes")
    run.add_argument("--resume", action="store_true",
                     help="continue the --journal of an unfinished run: only its missing "
                          "rollouts run")
    run.add_argument("--force-resume", action="store_true", dest="force_resume",
                     help="continue the --journal even though its header shows another run")
    run.add_argument("-o", "--output", dest="output", help="store the results DataFrame here")
    options.add_runtime_arguments(run)
    return parser


def _cell_parser() -> _Parser:
    parser = _Parser(prog="%%sandbox", description="Run this cell in a sandbox.")
    parser.add_argument("target", nargs="?",
                        help="a running sandbox's name, or a provider for a one-shot sandbox")
    parser.add_argument("--bash", action="store_true", help="run the cell as a shell script")
    parser.add_argument("-o", "--output", dest="output",
                        help="store the PythonResult / ExecResult in this variable")
    options.add_runtime_arguments(parser)
    return parser


LINE_PARSER = _line_parser()
CELL_PARSER = _cell_parser()


def _default_trait(opt: options.Option) -> TraitType:
    kind = {float: Float, int: Int}.get(opt.kind, Unicode)
    return kind(None, allow_none=True, help=f"default {opt.flag}: {opt.help}").tag(config=True)


#: ``default_<option>`` settings, one per runtime option of :mod:`sandboxnb.options`
#: (``%config SandboxMagics.default_cpu = 1``); ``None`` leaves the option to the config.
RuntimeDefaults = type(Configurable)(
    "RuntimeDefaults",
    (Configurable,),
    {f"default_{opt.name}": _default_trait(opt) for opt in options.OPTIONS},
)


def _check_name(value: str | None, flag: str) -> None:
    """A name that becomes a notebook variable: an identifier, not a keyword, not a builtin."""
    if value is not None:
        try:
            options.check_variable_name(value, flag)
        except ConfigError as err:
            raise UsageError(str(err)) from None


def _resume_line(args: argparse.Namespace, journal: Any) -> str:
    """The ``%sandbox run`` line that continues this run from its journal."""
    words = shlex.split(getattr(args, "line", "") or "run")
    kept, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word in ("--resume", "--force-resume"):
            continue
        elif word == "--journal":
            skip = True
        elif not word.startswith("--journal="):
            kept.append(word)
    return " ".join(["%sandbox", *map(shlex.quote, kept), "--journal",
                     shlex.quote(str(journal)), "--resume"])


def _ended_line(how: str, run: Any, args: argparse.Namespace) -> str:
    """One line on a run that ended early: what finished, where the rows and the journal are,
    and how to continue it."""
    counts = run.counts()
    cancelled = counts.get("cancelled", 0)
    finished = len(run.rows) - cancelled
    where = args.output or "_sandbox_run"
    line = (f"{how}: {finished}/{run.total} rollouts finished ({cancelled} cancelled); "
            f"{len(run.rows)} rows in {where}")
    if run.journal_path is not None:
        line += f"; journal {run.journal_path}"
        if finished < run.total:
            line += (f"; `{_resume_line(args, run.journal_path)}` runs the other "
                     f"{run.total - finished}")
    if not run.done():
        line += "; the run is still releasing its sandboxes"
    return line


class RemoteCellError(SandboxnbError):
    """The code of a ``%%sandbox`` cell failed remotely; shown as the remote traceback."""

    def __init__(self, message: str, remote_traceback: str = "") -> None:
        super().__init__(message)
        self.remote_traceback = remote_traceback

    def _render_traceback_(self) -> list[str]:
        lines = ["\x1b[31mRemote traceback (in the sandbox):\x1b[0m"]
        if self.remote_traceback:
            lines += self.remote_traceback.rstrip("\n").splitlines()
        else:
            lines.append(str(self))
        return lines


class RemoteValue:
    """The value of a remote cell's last expression, shown by its remote ``repr``."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


class _Streamer:
    """Collects streamed output (delivered by a connection's reader task, whose output would be
    attributed to the cell that opened the connection) and prints it from the magic's frame."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()

    def __call__(self, stream: str, data: Any) -> None:
        self._queue.put((stream, data))

    def flush(self) -> None:
        while True:
            try:
                stream, data = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(data, bytes):
                data = data.decode(errors="replace")
            target = sys.stderr if stream == "stderr" else sys.stdout
            target.write(data)
            target.flush()


@magics_class
class SandboxMagics(Magics, RuntimeDefaults):
    """The ``%sandbox`` / ``%%sandbox`` magics. Settings (``%config SandboxMagics``):
    ``default_provider``, ``max_concurrent`` and ``default_<option>`` for every runtime option
    (``default_cpu``, ``default_memory_mb``, ``default_run_timeout_s``, ...)."""

    default_provider = Unicode(
        "local", help="provider used when a magic names none (local, docker, modal, daytona)"
    ).tag(config=True)
    max_concurrent = Int(8, help="default concurrency of %sandbox run").tag(config=True)

    def __init__(self, shell: Any = None, manager_: SandboxManager | None = None, **kwargs: Any):
        super().__init__(shell=shell, **kwargs)
        self.manager = manager_ or manager()

    # ---- helpers -----------------------------------------------------------------------
    def _config(self, args: argparse.Namespace):
        """The runtime config of a magic: the ``default_<option>`` settings that are set, then
        the options given on the line (``none`` clears a setting)."""
        values = {opt.name: getattr(self, f"default_{opt.name}") for opt in options.OPTIONS}
        values = {name: value for name, value in values.items() if value is not None}
        values.update(options.given(args))
        try:
            return options.config_from_options(values)
        except ConfigError as err:
            raise UsageError(str(err)) from None

    def _validate(self, provider: str, config: Any):
        try:
            return validate_launch(provider, config=config)
        except ConfigError as err:
            raise UsageError(str(err)) from None

    # ---- entry point -------------------------------------------------------------------
    @line_cell_magic
    def sandbox(self, line: str, cell: str | None = None) -> Any:
        """Sandboxes from a notebook.

        Line magic::

          %sandbox launch [PROVIDER] [--name NAME [--replace]] [runtime options]
          %sandbox ls
          %sandbox stop NAME | --all
          %sandbox providers
          %sandbox doctor [PROVIDER] [runtime options]
          %sandbox run TASKSET --agent AGENT [--runtime PROVIDER] [--max-concurrent N]
                       [--repeats N] [--tasks GLOBS] [--limit N] [--rollout-timeout SECONDS]
                       [--journal PATH [--resume | --force-resume]] [-o VAR]
                       [runtime options]

        Cell magic (runs the cell in a sandbox: Python in its persistent namespace, or a shell
        script with --bash; output streams live; Kernel > Interrupt cancels it remotely)::

          %%sandbox [NAME | PROVIDER [runtime options]] [--bash] [-o VAR]

        Runtime options (the same in ``sandboxnb run`` and the launcher widget; a value
        ``none`` means no limit for a limit, the provider's default otherwise)::

        """
        remember_kernel_loop()
        if cell is not None:
            return self._cell(line, cell)
        args = LINE_PARSER.parse_argstring(line)
        args.line = line
        if args.command is None:
            raise UsageError(
                "%sandbox needs a subcommand: launch, ls, stop, providers, doctor or run "
                "(e.g. %sandbox launch local; see %sandbox?)"
            )
        return getattr(self, f"_cmd_{args.command}")(args)

    sandbox.__doc__ = (sandbox.__doc__ or "").rstrip() + "\n\n" + "".join(
        f"          {opt.flag} {opt.metavar}  ({opt.path}) {opt.help}\n" for opt in options.OPTIONS
    )

    # ---- subcommands -------------------------------------------------------------------
    def _cmd_launch(self, args: argparse.Namespace) -> None:
        _check_name(args.name, "--name")
        provider = args.provider or self.default_provider
        config = self._config(args)
        if args.replace and not args.name:
            raise UsageError("%sandbox launch --replace needs --name NAME (the sandbox to "
                             "replace)")
        replaced = self.manager.get(args.name) if args.replace and args.name else None
        try:
            record = self.manager.prepare(provider, args.name, config=config,
                                          replace=args.replace, namespace=self.shell.user_ns)
        except ConfigError as err:
            raise UsageError(str(err)) from None
        if record.job is not None:  # the same sandbox, already running: reused
            self.manager.wait_ready(record)
            print(f"sandbox {record.name} is already running with this configuration "
                  f"({record.provider}, id {record.id}, up {format_age(record.age_s)}): reusing "
                  f"it (--replace starts a fresh one)")
            return
        if replaced is not None:
            print(f"stopped the previous {replaced.name} ({replaced.provider}, id {replaced.id})")
        self.manager.start(record)
        self.manager.wait_ready(record)
        summary = record.summary()
        name = record.name
        print(f"sandbox {name} is running ({record.provider}, id {record.id}; "
              f"{summary['config']}).\n"
              f"  use it:   await {name}.exec(\"ls\")  or  await {name}.python(\"1 + 1\")\n"
              f"  a cell:   %%sandbox {name}  (first line of the cell)\n"
              f"  stop it:  %sandbox stop {name}")

    def _cmd_ls(self, args: argparse.Namespace) -> SandboxTable:
        self.manager.check_alive()  # a sandbox ended by its run timeout shows as ended
        return SandboxTable(self.manager.records())

    def _cmd_stop(self, args: argparse.Namespace) -> None:
        if args.all and args.name:
            raise UsageError("%sandbox stop: give either a NAME or --all, not both")
        if args.all:
            names = self.manager.stop_all()
            for name in names:
                self._forget(name)
            print(f"stopped {len(names)} sandbox(es)" + (f": {', '.join(names)}" if names else ""))
            return
        if not args.name:
            raise UsageError(
                "%sandbox stop needs a sandbox NAME or --all; running: "
                f"{', '.join(self.manager.names()) or 'none'}"
            )
        ended = self.manager.forget(args.name)
        if ended is not None:
            print(f"{args.name} had already ended ({ended.error}); removed it")
            return
        try:
            self.manager.stop(args.name)
        except KeyError:
            raise UsageError(self.manager.unknown_name(args.name)) from None
        self._forget(args.name)
        print(f"stopped {args.name}")

    def _forget(self, name: str) -> None:
        value = self.shell.user_ns.get(name)
        if isinstance(value, SandboxHandle):
            del self.shell.user_ns[name]

    def _cmd_providers(self, args: argparse.Namespace) -> ProvidersTable:
        return ProvidersTable(provider_rows())

    def _cmd_doctor(self, args: argparse.Namespace) -> Any:
        from sandboxnb.doctor import doctor

        runtime = args.provider or self.default_provider
        config = self._config(args)
        self._validate(runtime, config)
        report = run_blocking(doctor(runtime, config))
        print(report.text())
        self.shell.user_ns["_sandbox_doctor"] = report

    def _cmd_run(self, args: argparse.Namespace) -> Any:
        """Run a taskset, blocking the cell with a live monitor. On every way out (done,
        cancelled from the monitor, Kernel > Interrupt, failed) the rows so far go to ``-o NAME``
        and the run to ``_sandbox_run``, and one line says where they and the journal are."""
        from IPython.display import display

        from sandboxnb.notebook import monitor
        from sandboxnb.scheduler import start
        from sandboxnb.tasks import Taskset

        _check_name(args.output, "-o")
        if (args.resume or args.force_resume) and not args.journal:
            flag = "--force-resume" if args.force_resume else "--resume"
            raise UsageError(f"%sandbox run {flag} continues an existing journal: give its path "
                             "with --journal PATH (the run's first line printed it)")
        runtime = args.runtime or self.default_provider
        ns = self.shell.user_ns
        taskset_arg = ns.get(args.taskset, args.taskset) if args.taskset.isidentifier() and \
            args.taskset != "humaneval" else args.taskset
        agent = ns.get(args.agent, args.agent) if args.agent.isidentifier() and \
            args.agent != "oracle" else args.agent
        config = self._config(args)
        self._validate(runtime, config)

        try:
            tasks = Taskset.load(taskset_arg)
            if args.tasks is not None:
                tasks = tasks.select(options.parse_globs(args.tasks, "--tasks"))
            if args.limit is not None:
                tasks = Taskset(list(tasks)[: args.limit], name=tasks.name)
        except (ValueError, OSError) as err:
            raise UsageError(str(err)) from None
        holder: dict[str, Any] = {}

        async def go() -> Any:
            # started here, on the kernel loop (a plain shell runs no loop between cells)
            run = holder["run"] = start(
                tasks, agent, runtime, config=config,
                max_concurrent=args.max_concurrent or self.max_concurrent,
                repeats=args.repeats, timeout_s=args.rollout_timeout_s,
                journal=args.journal or "auto",
                resume="force" if args.force_resume else args.resume,
            )
            kept = len(run.rows)
            print(f"journal: {run.journal_path}" + (
                f" (resumed: {kept} rows kept, {run.total - kept} to run)" if kept else ""))
            display(monitor(run))  # live: progress, counts, mean reward, histogram
            try:
                return await run
            except BaseException:
                run.cancel()
                await run.wait()  # every sandbox released before the cell fails
                raise

        try:
            run = run_blocking(go())
        except (ValueError, FileExistsError, FileNotFoundError) as err:
            if "run" not in holder:  # refused before anything started
                raise UsageError(str(err)) from None
            self._ended(holder["run"], args)
            raise
        except KeyboardInterrupt:
            if "run" not in holder:
                raise
            self._bind(holder["run"], args)
            raise Interrupted(_ended_line("interrupted", holder["run"], args)) from None
        except BaseException:
            if "run" in holder:
                self._ended(holder["run"], args)
            raise
        print(run.summary() + (f"; journal {run.journal_path}" if run.journal_path else ""))
        self._bind(run, args)
        if args.output:
            print(f"{len(run.rows)} rows -> {args.output} (a pandas DataFrame)")
        if run.status != "done":
            print(_ended_line(run.status, run, args))

    def _ended(self, run: Any, args: argparse.Namespace) -> None:
        """A run that failed: bind what it has, say so in one line before the error shows."""
        self._bind(run, args)
        print(_ended_line(run.status if run.done() else "failed", run, args), file=sys.stderr)

    def _bind(self, run: Any, args: argparse.Namespace) -> None:
        if args.output:
            self.shell.user_ns[args.output] = run.to_pandas()
        self.shell.user_ns["_sandbox_run"] = run

    # ---- cell magic --------------------------------------------------------------------
    def _cell(self, line: str, cell: str) -> Any:
        args = CELL_PARSER.parse_argstring(line)
        _check_name(args.output, "-o")
        target = args.target
        record = self.manager.get(target) if target else None
        if target and record is None and self.manager.ended(target) is not None:
            raise UsageError(f"%%sandbox {target}: {self.manager.unknown_name(target)}")
        given = options.given(args)
        if record is not None:
            if given:
                flags = ", ".join(options.option(name).flag for name in given)
                raise UsageError(
                    f"%%sandbox {target}: runtime options ({flags}) apply only to a "
                    f"fresh sandbox; {target} is already running with its own config"
                )
            oneshot = None
        else:
            from sandboxnb.providers import provider_names

            provider = target or self.default_provider
            if provider not in provider_names():
                running = self.manager.names()
                hint = options.did_you_mean(provider, [*running, *provider_names()])
                raise UsageError(
                    f"%%sandbox {target}: no running sandbox and no provider of that name"
                    f"{hint}; running: {', '.join(running) or 'none'}; providers: "
                    f"{', '.join(provider_names())} (start one with %sandbox launch)"
                )
            _, config = self._validate(provider, self._config(args))
            oneshot = (provider, config)

        streamer = _Streamer()

        async def body(sb: Any) -> Any:
            if args.bash:
                return await sb.exec(cell, on_output=streamer)
            return await sb.python(cell, on_output=streamer, check=True)

        async def go() -> Any:
            if oneshot is None:
                return await body(record.sandbox)
            from sandboxnb.interactive import launch

            async with launch(oneshot[0], config=oneshot[1]) as sb:
                return await body(sb)

        from sandboxnb.errors import RemotePythonError

        try:
            result = run_blocking(go(), on_tick=streamer.flush,
                                  loop=record.loop if record is not None else None)
        except RemotePythonError as err:
            streamer.flush()
            raise RemoteCellError(str(err), err.traceback or str(err)) from None
        except KeyboardInterrupt:
            streamer.flush()
            raise Interrupted("interrupted: remote work cancelled; " + (
                f"sandbox {record.name} intact" if record is not None
                else "the one-shot sandbox was released")) from None
        if args.output:
            self.shell.user_ns[args.output] = result
        if args.bash:
            if getattr(result, "timed_out", False):
                raise RemoteCellError("remote script timed out")
            if result.exit_code != 0:
                raise RemoteCellError(f"remote script exited with code {result.exit_code}")
            return None
        value = getattr(result, "value", None)
        return RemoteValue(value) if value is not None else None
