"""The local sandbox's jail (bubblewrap), the clean environment, and which isolation works here.

``bwrap`` gives the sandbox its own user, pid, mount, ipc, uts, network (and, where possible,
cgroup) namespaces. It sees read-only: the system directories (``/usr``, ``/bin``, ``/lib*``,
``/sbin``), a minimal ``/etc``, its interpreter's prefixes (``sys.base_prefix`` and the venv with
its site-packages) and the server bundle; read-write: its own work and home directories (same paths
as on the host) and a private ``/tmp`` (tmpfs). Nothing else of the host: not the user's home,
not the host's ``/tmp``, not other sandboxes. It runs as uid/gid 1000 with no capabilities.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

__all__ = ["JAIL_GID", "JAIL_UID", "bwrap_argv", "bwrap_works", "clean_env", "unshare_works"]

JAIL_UID = JAIL_GID = 1000
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_ETC = ("hosts", "resolv.conf", "nsswitch.conf", "host.conf", "ssl", "ca-certificates",
        "ca-certificates.conf", "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "alternatives",
        "localtime", "timezone", "mime.types", "os-release", "protocols", "services",
        f"python{sys.version_info[0]}.{sys.version_info[1]}")
#: Variables of the owner's environment a sandbox keeps (``LC_*`` too); nothing else leaks in.
ALLOWED_ENV = ("LANG", "LANGUAGE", "TERM", "TZ")


def clean_env(*, python: str, home: str, tmp: str, extra: Mapping[str, str]) -> dict[str, str]:
    """A sandbox's environment: an allow-list of the owner's, the sandbox's own HOME and TMPDIR,
    PATH with the sandbox's interpreter first, then ``extra`` (the user's explicit choice)."""
    env = {k: v for k, v in os.environ.items() if k in ALLOWED_ENV or k.startswith("LC_")}
    system_path = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"
    env.update(PATH=f"{os.path.dirname(python)}:{system_path}", HOME=home, TMPDIR=tmp,
               USER="sandbox", LOGNAME="sandbox")
    env.update(extra)
    return env


@functools.cache
def bwrap_works() -> str | None:
    """None when ``bwrap`` can start a jail here, else why not."""
    exe = shutil.which("bwrap")
    if exe is None:
        return "bubblewrap (bwrap) is not installed: apt-get install bubblewrap"
    probe = [exe, "--unshare-all", "--die-with-parent", "--uid", str(JAIL_UID), "--gid",
             str(JAIL_GID), *_system_binds(), "--proc", "/proc", "--dev", "/dev", "--",
             "/bin/true"]
    return _run_probe(probe, "bwrap")


@functools.cache
def unshare_works() -> str | None:
    """None when util-linux ``unshare`` can make user/pid/mount/net namespaces here."""
    exe = shutil.which("unshare")
    if exe is None:
        return "util-linux unshare is not installed"
    return _run_probe([exe, "--user", "--map-root-user", "--pid", "--mount", "--net", "--fork",
                       "--mount-proc", "/bin/true"], "unshare")


def _run_probe(argv: list[str], what: str) -> str | None:
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, timeout=10, env={"PATH": "/usr/bin:/bin"})
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{what} cannot start here: {exc}"
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()[-300:]
        return (f"{what} cannot create namespaces here (exit {proc.returncode}: {err}); user "
                "namespaces may be disabled (sysctl user.max_user_namespaces / "
                "kernel.unprivileged_userns_clone)")
    return None


def _system_binds() -> list[str]:
    args: list[str] = []
    for path in _SYSTEM_DIRS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    return args


def _interpreter_dirs(python: str) -> list[str]:
    """Prefixes the interpreter needs: its own (venv) and its base installation."""
    dirs = []
    for exe in (python, os.path.realpath(python)):
        dirs.append(os.path.dirname(os.path.dirname(os.path.abspath(exe))))
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        dirs += [sys.prefix, sys.base_prefix]
    cfg = Path(os.path.dirname(os.path.dirname(os.path.abspath(python)))) / "pyvenv.cfg"
    try:  # a venv other than ours: its base interpreter
        for line in cfg.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "home":
                dirs.append(os.path.dirname(value.strip()))
    except OSError:
        pass
    keep = []
    for d in dict.fromkeys(os.path.realpath(d) for d in dirs):
        if d == "/" or any(d == s or d.startswith(s + "/") for s in _SYSTEM_DIRS):
            continue
        keep.append(d)
    return keep


def bwrap_argv(*, python: str, bundle: str, workdir: str, home: str, passwd_fd: int,
               group_fd: int) -> list[str]:
    """``bwrap ... --`` for one sandbox (the server's argv follows)."""
    exe = shutil.which("bwrap") or "bwrap"
    args = [exe, "--unshare-all", "--unshare-cgroup-try", "--die-with-parent", "--new-session",
            "--uid", str(JAIL_UID), "--gid", str(JAIL_GID), "--hostname", "sandbox",
            *_system_binds()]
    for name in _ETC:
        args += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    args += ["--ro-bind-data", str(passwd_fd), "/etc/passwd",
             "--ro-bind-data", str(group_fd), "/etc/group"]
    args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]  # before what may be in it
    for d in _interpreter_dirs(python):
        args += ["--ro-bind", d, d]
    args += ["--ro-bind", bundle, bundle, "--bind", workdir, workdir, "--bind", home, home,
             "--chdir", workdir, "--"]
    return args


def passwd_lines(home: str) -> tuple[bytes, bytes]:
    """The jail's ``/etc/passwd`` and ``/etc/group``: root, the sandbox user, nobody."""
    passwd = (f"root:x:0:0:root:/root:/bin/sh\n"
              f"sandbox:x:{JAIL_UID}:{JAIL_GID}:sandbox:{home}:/bin/sh\n"
              "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
    group = f"root:x:0:\nsandbox:x:{JAIL_GID}:\nnogroup:x:65534:\n"
    return passwd.encode(), group.encode()
