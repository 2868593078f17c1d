"""Docker engine details the provider needs: container output watching, removal that tolerates
``--rm``, the server archive, engine errors as clear messages, and availability."""

from __future__ import annotations

import contextlib
import functools
import io
import os
import tarfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from sandboxnb.bundle import bundle_bytes
from sandboxnb.errors import ProviderError
from sandboxnb.providers.base import Availability
from sandboxnb.providers.spec import SERVER_BUNDLE_NAME

#: Built locally by ``scripts/setup-docker`` (debootstrap bookworm minbase + python3).
DEFAULT_IMAGE = os.environ.get("SANDBOXNB_DOCKER_IMAGE", "sandboxnb/python:3.11")
SETUP_HINT = "run `sudo bash scripts/setup-docker`"
SERVER = f"/opt/sandboxnb/{SERVER_BUNDLE_NAME}"


@dataclass
class Container:
    """One sandbox container; a thread keeps the end of its output, then its exit code."""

    sandbox_id: str
    cid: str
    image: str = ""
    host_port: int | None = None
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=30))
    exit_code: int | None = None
    destroyed: bool = False
    ended: threading.Event = field(default_factory=threading.Event)  # output over, code known


def watch_output(client: Any, box: Container, sock: Any, started: float) -> None:
    """Keep the end of the container's output until it stops, then its exit code (from its
    ``die`` event: ``--rm`` may have removed it already; the event follows closely)."""
    from docker.utils.socket import frames_iter

    with contextlib.suppress(Exception):
        for _stream, data in frames_iter(sock, tty=False):
            box.tail.extend(data.decode(errors="replace").splitlines())
    close_socket(sock)
    deadline = time.time() + 2.0
    while not box.destroyed and box.exit_code is None and time.time() < deadline:
        with contextlib.suppress(Exception):
            for event in client.api.events(
                    since=started - 1, until=time.time(), decode=True,
                    filters={"container": box.cid, "event": "die"}):
                box.exit_code = int(event["Actor"]["Attributes"]["exitCode"])
        time.sleep(0.05)
    box.ended.set()  # a code still None: unknown


def remove_container(client: Any, cid: str) -> None:
    """``docker rm -f`` that tolerates a container already gone or being auto-removed."""
    import docker.errors

    try:
        client.api.remove_container(cid, force=True)
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as err:
        if "already in progress" not in str(err):
            raise
        with contextlib.suppress(Exception):  # the engine is removing it: wait until gone
            client.api.wait(cid, timeout=30, condition="removed")


def engine_availability() -> Availability:
    """Available when the SDK imports, the engine answers and the default image exists."""
    try:
        import docker
    except ImportError:
        return Availability(False, "the docker SDK is missing: pip install 'sandboxnb[docker]'")
    where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        with contextlib.closing(docker.from_env(timeout=5)) as client:
            if not client.images.list(name=DEFAULT_IMAGE):
                return Availability(False, f"the default image {DEFAULT_IMAGE} is missing; "
                                           f"{SETUP_HINT} to build it")
    except Exception as err:
        return Availability(False, f"no Docker engine answers at {where} ({err}); {SETUP_HINT}")
    return Availability(True, f"engine at {where}, image {DEFAULT_IMAGE}")


@functools.cache
def server_archive() -> bytes:
    """A tar holding the server zipapp, for ``put_archive`` into ``/`` (the engine makes dirs)."""
    data, buf, info = bundle_bytes(), io.BytesIO(), tarfile.TarInfo(SERVER.lstrip("/"))
    info.size, info.mode, info.mtime = len(data), 0o644, time.time()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def close_socket(sock: Any) -> None:
    for closer in (getattr(sock, "_sock", None), sock, getattr(sock, "_response", None)):
        with contextlib.suppress(Exception):  # None, or already closed
            closer.close()


def launch_error(image: str, err: Any) -> ProviderError:
    text = str(getattr(err, "explanation", None) or err)
    if "executable file not found" in text or "no such file or directory" in text:
        return ProviderError(f"docker: image {image!r} has no python3 (the sandbox server needs "
                             f"python3 >= 3.9 on PATH in the image); engine said: {text}")
    if "could not select device driver" in text:
        return ProviderError(f"docker: resources.gpu asks for GPUs but this engine has no GPU "
                             f"device driver (install the NVIDIA Container Toolkit, or drop "
                             f"gpu); engine said: {text}")
    return ProviderError(f"docker: could not start a container from {image!r}: {text}")
