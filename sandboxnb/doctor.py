"""``sandboxnb doctor PROVIDER``: a short live check of a configured provider.

It checks, in order: the provider is installed and configured, a sandbox can be created and
answers the handshake (acquire latency measured), commands run, files round-trip, the limits
reach the server as the policy says (and a memory limit holds, where the provider honours one),
and release really ends the sandbox, asked of the backend. Each failure says what to fix.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from sandboxnb.config import RuntimeConfig
from sandboxnb.providers import Provider, get_provider
from sandboxnb.providers.base import LABEL
from sandboxnb.providers.spec import limit_option

__all__ = ["Check", "DoctorReport", "doctor", "server_command_in_sandbox"]

_MEMORY_PROBE_MB = 256
_ACQUIRES = 3


@dataclass
class Check:
    """One step of the doctor: its name, whether it passed, what was seen, what to do."""

    name: str
    ok: bool
    detail: str = ""
    fix: str = ""


@dataclass
class DoctorReport:
    """Every check of one provider, and the measured acquire latency."""

    provider: str
    checks: list[Check] = field(default_factory=list)
    acquire_s: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(check.ok for check in self.checks)

    def text(self) -> str:
        """The report as terminal lines."""
        lines = [f"sandboxnb doctor: {self.provider}"]
        for check in self.checks:
            mark = "ok  " if check.ok else "FAIL"
            lines.append(f"  [{mark}] {check.name}: {check.detail}".rstrip(": "))
            if not check.ok and check.fix:
                lines.append(f"         fix: {check.fix}")
        verdict = "healthy" if self.ok else "NOT healthy"
        lines.append(f"{self.provider} is {verdict}")
        return "\n".join(lines)


async def server_command_in_sandbox(sandbox: Any) -> list[str]:
    """The server's argv as the sandbox's own OS sees it (``/proc/<server>/cmdline``)."""
    result = await sandbox.exec(["python3", "-c", (
        "import os,sys; pid=os.getppid(); "
        "sys.stdout.write(open(f'/proc/{pid}/cmdline','rb').read().decode().replace(chr(0), '\\n'))"
    )])
    if result.exit_code != 0:
        raise RuntimeError(f"cannot read the server's command line: {result.stderr.strip()}")
    return [arg for arg in result.stdout.split("\n") if arg]


async def doctor(runtime: str | Provider, config: RuntimeConfig | None = None,
                 **options: Any) -> DoctorReport:
    """Run the live checks against ``runtime`` (a name or a provider instance)."""
    provider = get_provider(runtime, **options)
    report = DoctorReport(provider.name)
    try:
        await _run_checks(provider, config or RuntimeConfig(), report)
    finally:
        if not isinstance(runtime, Provider):
            await provider.aclose()
    return report


async def _run_checks(provider: Provider, config: RuntimeConfig, report: DoctorReport) -> None:
    status = type(provider).availability()
    report.checks.append(Check("installed and configured", status.available, status.reason,
                               status.reason if not status.available else ""))
    if not status.available:
        return
    try:
        config = provider.check(config)
    except Exception as err:
        report.checks.append(Check("config", False, str(err), "change the config named above"))
        return
    sandbox_id = ""
    try:
        for attempt in range(_ACQUIRES):
            started = time.perf_counter()
            async with provider.open(config) as sb:
                report.acquire_s.append(time.perf_counter() - started)
                if attempt == 0:
                    sandbox_id = sb.id
                    await _check_sandbox(sb, config, report)
    except Exception as err:
        report.checks.append(Check(
            "create and handshake", False, f"{type(err).__name__}: {err}",
            "check credentials, quotas and the image; the message above names the step"))
        return
    median = statistics.median(report.acquire_s)
    report.checks.insert(1, Check("create and handshake", True,
                                  f"acquire {median * 1000:.0f} ms median of "
                                  f"{len(report.acquire_s)}"))
    await _check_teardown(provider, sandbox_id, report)
    if "resources.memory_mb" in provider.supported:
        await _check_memory_limit(provider, config, report)


async def _check_sandbox(sb: Any, config: RuntimeConfig, report: DoctorReport) -> None:
    result = await sb.exec("echo doctor-ok")
    report.checks.append(Check("exec", result.stdout.strip() == "doctor-ok",
                               f"exit {result.exit_code}", "the sandbox cannot run /bin/sh"))
    payload = bytes(range(256)) * 16
    await sb.write_file("doctor/probe.bin", payload)
    same = await sb.read_file("doctor/probe.bin") == payload
    seen = f"{len(payload)} bytes round-tripped" if same else "read back differs"
    report.checks.append(Check("files", same, seen, "the sandbox's filesystem is not writable"))
    argv = await server_command_in_sandbox(sb)
    limits = config.limits
    expected = {"--startup-timeout": limit_option(limits.startup_timeout_s),
                "--idle-timeout": limit_option(limits.idle_timeout_s)}
    seen = {flag: argv[argv.index(flag) + 1] for flag in expected if flag in argv}
    report.checks.append(Check(
        "limits reach the server", seen == expected, f"server options {seen}",
        f"the server did not get the policy's options {expected}"))


async def _check_teardown(provider: Provider, sandbox_id: str, report: DoctorReport) -> None:
    """Ask the backend whether the released sandbox is really gone."""
    for _ in range(100):
        left = await provider.list_sandboxes({f"{LABEL}.sandbox_id": sandbox_id})
        if not left:
            report.checks.append(Check("teardown", True, f"{sandbox_id} gone (asked the backend)"))
            return
        await asyncio.sleep(0.1)
    report.checks.append(Check("teardown", False, f"{sandbox_id} still listed after release",
                               f"run `sandboxnb gc --runtime {provider.name}`"))


async def _check_memory_limit(provider: Provider, config: RuntimeConfig,
                              report: DoctorReport) -> None:
    limited = config.merge({"resources": {"memory_mb": _MEMORY_PROBE_MB}})
    hog = f"b = bytearray({_MEMORY_PROBE_MB * 2} * 1024 * 1024); print('allocated')"
    async with provider.open(limited) as sb:
        result = await sb.exec(["python3", "-c", hog])
    held = "allocated" not in result.stdout
    report.checks.append(Check(
        "memory limit holds", held,
        f"{_MEMORY_PROBE_MB * 2} MiB refused under memory_mb={_MEMORY_PROBE_MB}" if held
        else f"allocated {_MEMORY_PROBE_MB * 2} MiB under memory_mb={_MEMORY_PROBE_MB}",
        "the backend does not enforce resources.memory_mb"))
