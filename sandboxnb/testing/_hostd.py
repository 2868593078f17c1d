"""The in-sandbox host daemon of :mod:`sandboxnb.testing.isolation` (stdlib only).

Run as ``python3 -I _hostd.py SOCKET`` as the first process of an isolated process tree. It
listens on the unix socket ``SOCKET``; every connection carries one JSON request line and gets
JSON reply lines (``exec`` streams output frames; ``connect`` turns into a raw byte relay to a TCP
port on the sandbox's own loopback). Inside a private network namespace it brings ``lo`` up.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import fcntl
import json
import os
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time

LOCK = threading.Lock()  # held while forking and while reaping foreign children
OWNED: dict[int, subprocess.Popen] = {}
BACKGROUND: dict[int, subprocess.Popen] = {}
BASE_ENV: dict[str, str] = {}
WORKDIR = "/"


def _lo_up() -> bool:
    """Bring the loopback interface up (needed in a fresh network namespace)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            req = struct.pack("16sH14s", b"lo", 0, b"")
            flags = struct.unpack("16sH", fcntl.ioctl(s, 0x8913, req)[:18])[1]
            fcntl.ioctl(s, 0x8914, struct.pack("16sH14s", b"lo", flags | 0x1, b""))
        return True
    except OSError:
        return False


def _bind_mount(src: str, dst: str) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        ms_bind, ms_rec = 4096, 16384
        return libc.mount(src.encode(), dst.encode(), None, ms_bind | ms_rec, None) == 0
    except OSError:
        return False


def _reaper() -> None:
    """Reap orphans re-parented to us (we may be PID 1) without stealing our own children."""
    while True:
        time.sleep(0.2)
        with LOCK:
            for pid, proc in list(OWNED.items()):
                if proc.poll() is not None:
                    OWNED.pop(pid, None)
            while True:
                try:
                    info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
                except ChildProcessError:
                    break
                if info is None or info.si_pid in OWNED:
                    break
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(info.si_pid, 0)


def _popen(req: dict, **kw) -> subprocess.Popen:
    env = dict(BASE_ENV)
    env.update(req.get("env") or {})
    cmd = req["cmd"]
    shell = isinstance(cmd, str)
    with LOCK:
        proc = subprocess.Popen(
            ["/bin/sh", "-c", cmd] if shell else cmd,
            cwd=req.get("cwd") or WORKDIR, env=env, **kw,
        )
        OWNED[proc.pid] = proc
    return proc


def _send(wfile, obj: dict) -> None:
    wfile.write((json.dumps(obj) + "\n").encode())
    wfile.flush()


def _pump(src, stream: str, wfile, wlock: threading.Lock) -> None:
    while True:
        chunk = src.read1(65536) if hasattr(src, "read1") else src.read(65536)
        if not chunk:
            return
        with wlock:
            _send(wfile, {"stream": stream, "data": base64.b64encode(chunk).decode()})


def _relay(a: socket.socket, b: socket.socket) -> None:
    try:
        while True:
            data = a.recv(65536)
            if not data:
                break
            b.sendall(data)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        b.shutdown(socket.SHUT_WR)


def _kill_descendants() -> None:
    me = os.getpid()
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    parents[int(entry)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    doomed, frontier = set(), {me}
    while frontier:
        nxt = {pid for pid, ppid in parents.items() if ppid in frontier and pid not in doomed}
        doomed |= nxt
        frontier = nxt
    for pid in doomed:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


class Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        line = self.rfile.readline(64 * 1024 * 1024)
        if not line:
            return
        try:
            req = json.loads(line)
            op = req["op"]
            getattr(self, "op_" + op)(req)
        except Exception as err:  # reported to the caller, never fatal to the daemon
            with contextlib.suppress(OSError):
                _send(self.wfile, {"ok": False, "error": f"{type(err).__name__}: {err}"})

    def op_ping(self, req: dict) -> None:
        _send(self.wfile, {"ok": True, "pid": os.getpid()})

    def op_exec(self, req: dict) -> None:
        stdin = base64.b64decode(req.get("stdin") or "")
        proc = _popen(req, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _send(self.wfile, {"ok": True, "pid": proc.pid})
        wlock = threading.Lock()
        pumps = [
            threading.Thread(target=_pump, args=(src, name, self.wfile, wlock), daemon=True)
            for src, name in ((proc.stdout, "stdout"), (proc.stderr, "stderr"))
        ]
        for t in pumps:
            t.start()
        try:
            if stdin:
                proc.stdin.write(stdin)
            proc.stdin.close()
        except OSError:
            pass
        timeout = req.get("timeout")
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            proc.wait()
        for t in pumps:
            t.join(5)
        OWNED.pop(proc.pid, None)
        with wlock:
            _send(self.wfile, {"exit": proc.returncode, "timed_out": timed_out})

    def op_spawn(self, req: dict) -> None:
        for key in ("stdout", "stderr"):
            if req.get(key):
                os.makedirs(os.path.dirname(req[key]) or ".", exist_ok=True)
        out = open(req["stdout"], "ab") if req.get("stdout") else subprocess.DEVNULL
        err = open(req["stderr"], "ab") if req.get("stderr") else subprocess.DEVNULL
        try:
            proc = _popen(req, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        finally:
            for fh in (out, err):
                if fh is not subprocess.DEVNULL:
                    fh.close()
        BACKGROUND[proc.pid] = proc
        _send(self.wfile, {"ok": True, "pid": proc.pid})

    def op_status(self, req: dict) -> None:
        proc = BACKGROUND.get(req["pid"])
        if proc is None:
            raise KeyError(f"no background process {req['pid']}")
        _send(self.wfile, {"ok": True, "exit": proc.poll()})

    def op_kill(self, req: dict) -> None:
        proc = BACKGROUND.get(req["pid"]) or OWNED.get(req["pid"])
        if proc is not None and proc.poll() is None:
            proc.send_signal(req.get("signal", signal.SIGKILL))
        _send(self.wfile, {"ok": True})

    def op_write(self, req: dict) -> None:
        path = req["path"]
        if req.get("mkdirs", True):
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(base64.b64decode(req["data"]))
        if req.get("mode") is not None:
            os.chmod(path, req["mode"])
        _send(self.wfile, {"ok": True})

    def op_read(self, req: dict) -> None:
        with open(req["path"], "rb") as fh:
            data = fh.read()
        _send(self.wfile, {"ok": True, "data": base64.b64encode(data).decode()})

    def op_connect(self, req: dict) -> None:
        try:
            upstream = socket.create_connection((req.get("host", "127.0.0.1"), req["port"]), 10)
        except OSError as err:
            _send(self.wfile, {"ok": False, "error": f"connect to port {req['port']}: {err}"})
            return
        upstream.settimeout(None)
        _send(self.wfile, {"ok": True})
        down = self.request
        t = threading.Thread(target=_relay, args=(upstream, down), daemon=True)
        t.start()
        _relay(down, upstream)
        t.join()
        upstream.close()

    def op_shutdown(self, req: dict) -> None:
        _kill_descendants()
        _send(self.wfile, {"ok": True})
        os._exit(0)


class Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True


def main() -> None:
    global WORKDIR
    sock_path = sys.argv[1]
    config = json.loads(sys.stdin.readline())
    BASE_ENV.update(config["env"])
    server = Server(sock_path, Handler)  # bound before /tmp is replaced (root_dir may be there)
    report = {"lo": False, "private_tmp": False}
    if config.get("netns"):
        report["lo"] = _lo_up()
    if config.get("tmp_dir") and config.get("mountns"):
        report["private_tmp"] = _bind_mount(config["tmp_dir"], "/tmp")
    WORKDIR = config.get("workdir") or "/"
    os.makedirs(WORKDIR, exist_ok=True)
    if os.getpid() != 1:
        with contextlib.suppress(AttributeError, OSError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans come back to us
    threading.Thread(target=_reaper, daemon=True).start()
    sys.stdout.write("READY " + json.dumps(report) + "\n")
    sys.stdout.flush()
    server.serve_forever()


if __name__ == "__main__":
    main()
