"""Attacks on the local provider's isolation, each through real sandboxes.

The default local sandbox (``isolation="auto"``: the bubblewrap jail here) must not see the
owner's secrets or files, nor other sandboxes; teardown (release, or the owner's kill -9) must
leave no process, directory or cgroup; and releasing a sandbox must never signal a process that
is not its own, whatever pid it was given.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest

from sandboxnb.client import connect
from sandboxnb.providers.local import LocalProvider
from sandboxnb.providers.local_cgroup import find_hierarchies
from sandboxnb.providers.local_jail import bwrap_works

from .helpers import processes_with, wait_until, wait_until_async

NS_LAST_PID = Path("/proc/sys/kernel/ns_last_pid")
#: How long after a release or an owner's death the sandbox's processes may take to vanish.
GONE_WITHIN_S = 15.0
REPO = str(Path(__file__).resolve().parents[1])


def _tree_has(marker: str) -> set[int]:
    return {p for p in processes_with(marker) if _running(p)}


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != "zombie"
    except psutil.NoSuchProcess:  # gone between the listing and the look
        return False


@pytest.fixture
def secret_env(monkeypatch):
    secrets = {"AWS_SECRET_ACCESS_KEY": f"aws-{uuid.uuid4().hex}",
               "MODAL_TOKEN_SECRET": f"modal-{uuid.uuid4().hex}"}
    for key, value in secrets.items():
        monkeypatch.setenv(key, value)
    return secrets


def test_the_default_is_the_jail_here():
    assert bwrap_works() is None, "bwrap must work on this machine (scripts/setup-bubblewrap)"
    assert LocalProvider().isolation == "bwrap"


# -- 1. pid reuse ------------------------------------------------------------------------------
def _spawn_with_pid(pid: int) -> subprocess.Popen[bytes] | None:
    """An unrelated ``setsid sleep`` on the host that got ``pid`` (forced via ns_last_pid)."""
    for _ in range(200):  # another process on the machine may take the pid first: retry
        NS_LAST_PID.write_text(str(pid - 1))
        proc = subprocess.Popen(["setsid", "sleep", "300"])
        if proc.pid == pid:
            return proc
        proc.kill()
        proc.wait()
    return None


async def test_release_never_kills_a_process_that_got_a_recycled_pid(tmp_path):
    """A command's pid, reused by an unrelated host process after the command ended, must not
    be signalled when the sandbox is released (the server used to kill every group it ever
    started). Forced in isolation 'none', where command pids are host pids (in the jail they
    live in the sandbox's own pid namespace)."""
    if not os.access(NS_LAST_PID, os.W_OK):
        if os.environ.get("CI"):  # CI runs as root: the attack must run there
            pytest.fail("/proc/sys/kernel/ns_last_pid is not writable in CI")
        pytest.skip("needs a writable /proc/sys/kernel/ns_last_pid (root)")
    provider = LocalProvider(root=tmp_path, isolation="none")
    victim = None
    try:
        async with provider.sandbox() as ep, await connect(ep) as sb:
            for _ in range(5):  # another process may take the pid first: try a fresh one
                pid = int((await sb.exec("echo $$")).stdout)
                victim = _spawn_with_pid(pid)
                if victim is not None:
                    break
            else:
                pytest.fail("could not get a command's pid back for an unrelated process")
        wait_until(lambda: not _tree_has(ep.sandbox_id), GONE_WITHIN_S, "the sandbox to end")
        assert victim.poll() is None, f"unrelated process {pid} died: {victim.returncode}"
    finally:
        if victim is not None:
            victim.kill()
            victim.wait()


# -- 2. secrets in the environment -------------------------------------------------------------
@pytest.mark.parametrize("isolation", ["auto", "namespaces", "none"])
async def test_owner_secrets_are_not_in_the_sandbox_environment(tmp_path, secret_env,
                                                                isolation):
    provider = LocalProvider(root=tmp_path, isolation=isolation, env={"GIVEN": "yes"})
    async with provider.sandbox() as ep, await connect(ep) as sb:
        shell = (await sb.exec("env")).stdout
        python = (await sb.python("import os; dict(os.environ)")).value
        child = (await sb.exec(["python3", "-c", "import os; print(dict(os.environ))"])).stdout
        home = (await sb.exec("echo $HOME; echo $TMPDIR")).stdout.split()
    for seen in (shell, python, child):
        for key, value in secret_env.items():
            assert key not in seen and value not in seen
        assert "GIVEN" in seen  # what the user passes explicitly does reach it
    assert home[0].startswith(ep.meta["dir"]) and home[1] in ("/tmp", f"{ep.meta['dir']}/tmp")


# -- 3. the owner's files ----------------------------------------------------------------------
@pytest.fixture
def host_secret():
    secret = Path("/tmp", f"host-secret-{uuid.uuid4().hex}")
    secret.write_text("s3cret")
    yield secret
    secret.unlink()


def _home_entries_not_bound(home: str) -> set[str]:
    """The owner's home entries, less mount points of bound directories (an interpreter)."""
    bound = {Path(p).relative_to(home).parts[0] for p in (sys.prefix, sys.base_prefix)
             if p.startswith(home + "/")}
    return set(os.listdir(home)) - bound


def _read(path: Path) -> str:
    return path.read_text()


def _exists(*paths: Path) -> list[Path]:
    return [p for p in paths if p.exists()]


async def test_the_jail_cannot_read_home_or_host_tmp_nor_write_outside(tmp_path, host_secret):
    home = str(Path.home())
    secret = host_secret
    escape = tmp_path / "escaped"
    async with LocalProvider(root=tmp_path).sandbox() as ep, await connect(ep) as sb:
        listing = await sb.exec(["ls", "-a", home])
        mine = _home_entries_not_bound(home)
        assert mine and not mine & set(listing.stdout.split()), listing.stdout
        assert (await sb.exec(["cat", str(secret)])).exit_code != 0
        with pytest.raises(Exception, match=r"FileNotFoundError|PermissionError"):
            await sb.python(f"open({str(secret)!r}).read()")
        for target in (Path("/usr/escaped"), Path(sys.base_prefix, "escaped")):
            r = await sb.exec(f"echo x >> {target}")
            assert r.exit_code != 0, f"wrote {target}"
        record = Path(ep.meta["dir"], "owner.json")
        before = _read(record)
        for target in (escape, record):  # these land in the private /tmp if anywhere
            await sb.exec(f"echo x >> {target}")
        assert _read(record) == before
        assert (await sb.exec("echo ok > /tmp/mine && cat /tmp/mine")).stdout == "ok\n"
        assert (await sb.exec("echo ok > in-work && cat in-work")).stdout == "ok\n"
        assert (await sb.exec("id -u")).stdout.strip() != "0"
    assert not _exists(escape, Path("/tmp/mine"), Path("/usr/escaped"))


# -- 4. one sandbox against another ------------------------------------------------------------
SOCKET_ATTACK = """
import socket, sys
url = sys.argv[1]
try:
    if url.startswith("unix://"):
        s = socket.socket(socket.AF_UNIX); s.settimeout(2); s.connect(url[len("unix://"):])
    else:
        host, port = url[len("tcp://"):].rsplit(":", 1)
        s = socket.create_connection((host, int(port)), 2)
    print("connected")
except OSError as exc:
    print("refused", exc)
"""


async def test_a_sandbox_cannot_read_or_reach_another(tmp_path):
    provider = LocalProvider(root=tmp_path)
    async with provider.sandbox() as ep_a, provider.sandbox() as ep_b, \
            await connect(ep_a) as a, await connect(ep_b) as b:
        await b.exec("echo b-private > note")
        b_dir, b_work = ep_b.meta["dir"], ep_b.meta["workdir"]
        assert (await a.exec(["ls", b_dir])).exit_code != 0
        assert (await a.exec(["cat", f"{b_work}/note"])).exit_code != 0
        reach = await a.exec(["python3", "-c", SOCKET_ATTACK, ep_b.url])
        assert reach.stdout.startswith("refused"), reach.stdout + reach.stderr


# -- 5. escapes: setsid + double fork ----------------------------------------------------------
def _escape_command(marker: str) -> str:
    """A double-forked, setsid'd python that sleeps, named by ``marker`` in its argv."""
    return (f"(setsid python3 -c 'import time; time.sleep(300)' {marker} "
            "> /dev/null 2>&1 < /dev/null &) ; true")


async def test_escaped_processes_die_on_release_without_cgroups(tmp_path):
    """No writable cgroup (as on a cgroup v2 host without delegation): the jail's pid namespace
    still ends every process the sandbox started."""
    marker = f"escape-{uuid.uuid4().hex}"
    async with LocalProvider(root=tmp_path, cgroups=False).sandbox() as ep, \
            await connect(ep) as sb:
        for i in range(5):
            assert (await sb.exec(_escape_command(f"{marker}-{i}"))).ok
        wait_until(lambda: len(_tree_has(marker)) == 5, 10, "the escapes to run")
    await wait_until_async(lambda: not _tree_has(marker), GONE_WITHIN_S,
                           "the escaped processes to die with the sandbox")
    assert not any(tmp_path.iterdir())


OWNER = """
import asyncio, json, sys
sys.path.insert(0, {repo!r})
from sandboxnb.client import connect
from sandboxnb.config import RuntimeConfig
from sandboxnb.providers.local import LocalProvider

async def main():
    config = RuntimeConfig().merge({{"limits": {{"idle_timeout_s": None}}}})
    async with LocalProvider().sandbox(config) as ep, await connect(ep) as sb:
        await sb.exec({escape!r})
        await sb.exec("sleep 300 > /dev/null 2>&1 &")
        print(json.dumps({{"id": ep.sandbox_id, "dir": ep.meta["dir"]}}), flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


async def _start_one(provider: LocalProvider, leftover: str | None) -> None:
    async with provider.sandbox():
        assert leftover is None or not _exists(Path(leftover))


def _cgroup_dirs(sandbox_id: str) -> list[Path]:
    return [h.parent / sandbox_id for h in find_hierarchies() if (h.parent / sandbox_id).exists()]


def test_owner_kill_leaves_nothing_after_gc(tmp_path):
    """The owner is killed with SIGKILL (no teardown runs): the sandbox's processes, escapes
    included, die with it; its directory and cgroups are found and removed by
    ``sandboxnb gc --runtime local --delete``."""
    marker = f"escape-{uuid.uuid4().hex}"
    env = dict(os.environ, TMPDIR=str(tmp_path), PYTHONPATH=REPO)
    script = OWNER.format(repo=REPO, escape=_escape_command(marker))
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             env=env)
    try:
        info = json.loads(owner.stdout.readline())
        wait_until(lambda: _tree_has(marker), 10, "the escape to run")
        assert Path(info["dir"]).is_dir()
        owner.kill()
        owner.wait()
        wait_until(lambda: not _tree_has(marker) and not _tree_has(info["id"]), GONE_WITHIN_S,
                   "the sandbox's processes to die with their owner")
        listed = subprocess.run([sys.executable, "-m", "sandboxnb", "gc", "--runtime", "local"],
                                env=env, capture_output=True, text=True, timeout=60)
        assert info["id"] in listed.stdout, listed.stdout + listed.stderr
        assert Path(info["dir"]).is_dir()  # listing does not remove
        gc = subprocess.run([sys.executable, "-m", "sandboxnb", "gc", "--runtime", "local",
                             "--delete"], env=env, capture_output=True, text=True, timeout=60)
        assert f"released 1 sandbox(es): {info['id']}" in gc.stdout, gc.stdout + gc.stderr
        assert not Path(info["dir"]).exists()
        assert not _cgroup_dirs(info["id"])
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()


def test_a_new_sandbox_sweeps_what_dead_owners_left(tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path), PYTHONPATH=REPO)
    script = OWNER.format(repo=REPO, escape="true")
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             env=env)
    try:
        info = json.loads(owner.stdout.readline())
        owner.kill()
        owner.wait()
        wait_until(lambda: not _tree_has(info["id"]), GONE_WITHIN_S, "the sandbox to die")
        assert Path(info["dir"]).is_dir()
        LocalProvider(root=tmp_path)  # constructing one (as `sandboxnb providers` does) is not
        assert Path(info["dir"]).is_dir()  # starting one: the leftovers stay to be listed
        asyncio.run(_start_one(LocalProvider(root=tmp_path), info["dir"]))
        assert not Path(info["dir"]).exists() and not _cgroup_dirs(info["id"])
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()


def _forge(root: Path, sandbox_id: str, cgroups: list[str]) -> Path:
    """A leftover record as anyone who can write the temp root could plant it."""
    leftover = root / f"sandboxnb-{sandbox_id}"
    leftover.mkdir(mode=0o700)
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that is surely not running any more
    (leftover / "owner.json").write_text(json.dumps(
        {"sandbox_id": sandbox_id, "pid": dead.pid, "start": "0", "labels": {},
         "cgroups": cgroups}))
    return leftover


@pytest.mark.parametrize("forgery", ["foreign-cgroup", "other-uid"])
def test_a_forged_leftover_never_signals_a_process(tmp_path, forgery):
    """A planted ``owner.json`` naming a cgroup that holds an unrelated process (or a record
    that another user owns) is neither swept nor listed: the process lives on."""
    victim = subprocess.Popen(["sleep", "60"])
    try:
        fake_group = tmp_path / "fake-cgroup"
        fake_group.mkdir()
        (fake_group / "cgroup.procs").write_text(f"{victim.pid}\n")
        if forgery == "foreign-cgroup":
            leftover = _forge(tmp_path, "local-0123456789ab", [str(fake_group)])
        else:
            leftover = _forge(tmp_path, "local-0123456789ab", [])
            os.chown(leftover, 65534, 65534)
            os.chown(leftover / "owner.json", 65534, 65534)
        env = dict(os.environ, TMPDIR=str(tmp_path), PYTHONPATH=REPO)
        gc = subprocess.run([sys.executable, "-m", "sandboxnb", "gc", "--runtime", "local",
                             "--delete"], env=env, capture_output=True, text=True, timeout=60)
        assert "local-0123456789ab" not in gc.stdout, gc.stdout + gc.stderr
        asyncio.run(_start_one(LocalProvider(root=tmp_path), None))
        assert victim.poll() is None, "a forged record got an unrelated process killed"
        assert leftover.is_dir()
    finally:
        victim.kill()
        victim.wait()


# -- 6. fork bomb ------------------------------------------------------------------------------
FORK_BOMB = """
import os, time
children = []
for _ in range(2000):  # bounded: a missing limit fails the test instead of the machine
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    children.append(pid)
print(len(children))
for pid in children:
    os.kill(pid, 9)
"""


async def test_a_fork_bomb_is_bounded(tmp_path):
    provider = LocalProvider(root=tmp_path, max_processes=64)
    async with provider.sandbox() as ep, await connect(ep) as sb:
        r = await sb.exec(["python3", "-c", FORK_BOMB], timeout=120)
        assert r.exit_code == 0, r.stderr
        assert int(r.stdout) < 64, f"{r.stdout.strip()} processes forked under a limit of 64"
        assert (await sb.exec("echo alive")).stdout == "alive\n"  # the sandbox still works
    assert not any(tmp_path.iterdir())


def test_bad_keywords_are_refused_naming_the_value():
    with pytest.raises(ValueError, match=r"max_processes = 0 .*integer from 8"):
        LocalProvider(max_processes=0)
    with pytest.raises(ValueError, match=r"env\['A=B'\]"):
        LocalProvider(env={"A=B": "x"})
    with pytest.raises(ValueError, match=r"isolation = 'vm'.*auto, bwrap, namespaces, none"):
        LocalProvider(isolation="vm")
