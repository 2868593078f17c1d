"""Docker provider: one fresh container per sandbox, on a local engine or ``DOCKER_HOST``.

Any image with ``python3`` (>= 3.9) works: the stdlib-only sandbox server is copied into the
container as a zipapp before it starts, so nothing of sandboxnb has to be installed in the image.
The server port is published on ``127.0.0.1`` only (an ephemeral host port) and every container
carries ``sandboxnb*`` labels, so it can be found again (:meth:`DockerProvider.live_sandboxes`,
:meth:`DockerProvider.reap`). The ``docker`` SDK is synchronous: every call runs in the
provider's own thread pool, never on the event loop.

Resources: ``cpu`` -> ``--cpus``, ``memory_mb`` -> ``--memory`` (swap included, so it is a hard
cap), ``gpu`` -> ``--gpus N`` (a count only: Docker cannot select a GPU model). Limits:
``startup_timeout_s`` bounds acquire, ``run_timeout_s`` kills the container, ``idle_timeout_s``
is the server's own dead-man switch (the container exits with it and is removed by the engine).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import json
import os
import secrets
import socket
import tarfile
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any, ClassVar, TypeVar

from sandboxnb.config import ConfigError, RuntimeConfig, UnsupportedFieldError
from sandboxnb.providers.base import Availability, Endpoint, Provider, ProviderError, owner_label

__all__ = ["BUSYBOX_IMAGE", "DEFAULT_IMAGE", "LABEL", "DockerProvider"]

#: Built locally by ``scripts/setup-docker`` (debootstrap bookworm minbase + python3).
DEFAULT_IMAGE = os.environ.get("SANDBOXNB_DOCKER_IMAGE", "sandboxnb/python:3.11")
#: A python-less image built by ``scripts/setup-docker`` (for negative checks).
BUSYBOX_IMAGE = os.environ.get("SANDBOXNB_BUSYBOX_IMAGE", "sandboxnb/busybox:latest")
#: Every container we create carries ``LABEL=1``; the other labels are ``LABEL + ".<key>"``.
LABEL = "sandboxnb"
SETUP_HINT = "run `sudo bash scripts/setup-docker`"

_SERVER_DIR = "/opt/sandboxnb"
_SERVER_FILE = "sandboxnb.server.pyz"
_PORT = 7000
_READY = b"SANDBOXNB_READY "
_GENERIC_GPU = frozenset({"any", "gpu", "nvidia"})
_DEFAULT_STARTUP_S = 300.0
_T = TypeVar("_T")


def _gpu_count(config: RuntimeConfig) -> int | None:
    """The GPU count Docker can honour, or ``None``; raises for a GPU model."""
    gpu = config.resources.gpu
    if gpu is None:
        return None
    kind = gpu.type.strip().lower()
    if kind in _GENERIC_GPU:
        return gpu.count
    if kind.isdigit() and gpu.count == 1:  # "gpu: 2" parses as type "2"
        return int(kind)
    err = UnsupportedFieldError("docker", "resources.gpu.type", gpu.type, ["resources.gpu count"])
    err.args = (
        f"docker does not support resources.gpu.type (got {gpu.type!r} in gpu={str(gpu)!r}): "
        "Docker selects GPUs by count only; accepted: a count such as gpu='2' or "
        f"gpu='any:{gpu.count}' (use a cloud provider to pick a GPU model)",
    )
    raise err


class DockerProvider(Provider):
    """Sandboxes as Docker containers running the sandboxnb server.

    Options: ``image`` (default :data:`DEFAULT_IMAGE`; a config's ``image`` wins), ``base_url``
    (engine URL; default ``DOCKER_HOST`` or the local socket), ``network`` (Docker network the
    container joins, default ``"bridge"``), ``bind_host``/``connect_host`` (where the server port
    is published and reached; ``127.0.0.1``), ``pids_limit``, ``init`` (``--init``), ``pull``
    (pull an image missing on the engine), ``env`` (extra container environment), ``labels``,
    ``max_workers`` (threads for SDK calls), ``session_id`` (labels this provider's containers).
    """

    name: ClassVar[str] = "docker"
    supported: ClassVar[frozenset[str]] = frozenset(
        {"image", "resources.cpu", "resources.memory_mb", "resources.gpu", "limits"}
    )
    description: ClassVar[str] = "a fresh Docker container per sandbox (local or DOCKER_HOST)"

    def __init__(
        self,
        *,
        image: str = DEFAULT_IMAGE,
        base_url: str | None = None,
        network: str = "bridge",
        bind_host: str = "127.0.0.1",
        connect_host: str = "127.0.0.1",
        pids_limit: int | None = 4096,
        init: bool = True,
        pull: bool = True,
        env: dict[str, str] | None = None,
        labels: dict[str, str] | None = None,
        max_workers: int = 64,
        session_id: str | None = None,
        api_timeout_s: float = 120.0,
    ) -> None:
        if not image:
            raise ConfigError(
                f"docker image = {image!r}: expected an image name such as {DEFAULT_IMAGE!r}"
            )
        if network in ("none", "host"):
            raise ConfigError(
                f"docker network = {network!r}: the server port must be published; accepted: "
                "'bridge' or a user-defined network name (use an --internal network to cut egress)"
            )
        if max_workers < 2:
            raise ConfigError(f"docker max_workers = {max_workers!r}: expected an int >= 2")
        self.image, self.base_url, self.network = image, base_url, network
        self.bind_host, self.connect_host = bind_host, connect_host
        self.pids_limit, self.init, self.pull = pids_limit, init, pull
        self.env, self.extra_labels = dict(env or {}), dict(labels or {})
        self.max_workers, self.api_timeout_s = max_workers, api_timeout_s
        self.session_id = session_id or secrets.token_hex(6)
        self.owner = owner_label()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._pull_locks: dict[str, threading.Lock] = {}
        self._archive: bytes | None = None

    # ----------------------------------------------------------------- plumbing
    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                self.max_workers, thread_name_prefix="sandboxnb-docker"
            )
        return self._pool

    def _submit(self, fn: Callable[..., _T], *args: Any) -> concurrent.futures.Future[_T]:
        return self._executor().submit(fn, *args)

    async def _call(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.wrap_future(self._submit(fn, *args))

    def _docker(self) -> Any:
        """The shared SDK client (created on first use, in a worker thread)."""
        with self._client_lock:
            if self._client is None:
                import docker

                pool = self.max_workers + 4
                if self.base_url:
                    self._client = docker.DockerClient(
                        base_url=self.base_url, timeout=self.api_timeout_s, max_pool_size=pool
                    )
                else:
                    self._client = docker.from_env(timeout=self.api_timeout_s, max_pool_size=pool)
            return self._client

    def _server_archive(self) -> bytes:
        """A tar holding the server zipapp, for ``put_archive`` into ``/``."""
        if self._archive is None:
            from sandboxnb.server import bundle_bytes

            data, now, buf = bundle_bytes(), time.time(), io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as tar:
                for name in ("opt", "opt/sandboxnb"):
                    info = tarfile.TarInfo(name)
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, now
                    tar.addfile(info)
                info = tarfile.TarInfo(f"opt/sandboxnb/{_SERVER_FILE}")
                info.size, info.mode, info.mtime = len(data), 0o644, now
                tar.addfile(info, io.BytesIO(data))
            self._archive = buf.getvalue()
        return self._archive

    # ----------------------------------------------------------------- config
    def check(self, config: RuntimeConfig) -> RuntimeConfig:
        """Reject unsupported fields and GPU models before anything starts."""
        config = super().check(config)
        _gpu_count(config)
        return config

    def labels_for(self, sandbox_id: str) -> dict[str, str]:
        """The labels a container of ``sandbox_id`` carries."""
        return {
            **self.extra_labels,
            LABEL: "1",
            f"{LABEL}.sandbox_id": sandbox_id,
            f"{LABEL}.owner": self.owner,
            f"{LABEL}.pid": str(os.getpid()),
            f"{LABEL}.session": self.session_id,
            f"{LABEL}.created": datetime.now(UTC).isoformat(timespec="seconds"),
        }

    def _create_kwargs(self, config: RuntimeConfig, sandbox_id: str, token: str) -> dict[str, Any]:
        res, lim = config.resources, config.limits
        startup = lim.startup_timeout_s or _DEFAULT_STARTUP_S
        command = [
            "python3", f"{_SERVER_DIR}/{_SERVER_FILE}", "--host", "0.0.0.0", "--port", str(_PORT),
            "--sandbox-id", sandbox_id, "--startup-timeout", f"{startup:g}",
        ]
        if lim.idle_timeout_s is not None:
            command += ["--idle-timeout", f"{lim.idle_timeout_s:g}"]
        kwargs: dict[str, Any] = {
            "image": config.image or self.image,
            "command": command,
            "name": f"sandboxnb-{sandbox_id}",
            "labels": self.labels_for(sandbox_id),
            "environment": {**self.env, "SANDBOXNB_TOKEN": token, "PYTHONUNBUFFERED": "1"},
            "ports": {f"{_PORT}/tcp": (self.bind_host, None)},
            "network": self.network,
            "auto_remove": True,
            "init": self.init,
            "detach": True,
            "stdin_open": False,
            "tty": False,
        }
        if self.pids_limit:
            kwargs["pids_limit"] = self.pids_limit
        if res.cpu is not None:
            kwargs["nano_cpus"] = int(res.cpu * 1e9)
        if res.memory_mb is not None:
            kwargs["mem_limit"] = kwargs["memswap_limit"] = f"{res.memory_mb}m"
        gpus = _gpu_count(config)
        if gpus:  # what `--gpus N` sends
            kwargs["device_requests"] = [{"count": gpus, "capabilities": [["gpu"]]}]
        return kwargs

    # ----------------------------------------------------------------- sync phases
    def _ensure_image(self, image: str) -> None:
        import docker.errors

        client = self._docker()
        try:
            client.images.get(image)
            return
        except docker.errors.ImageNotFound:
            if not self.pull:
                raise ProviderError(
                    f"docker image {image!r} is not on the engine and pull=False; "
                    f"build it ({SETUP_HINT} builds {DEFAULT_IMAGE}) or `docker pull {image}`"
                ) from None
        lock = self._pull_locks.setdefault(image, threading.Lock())
        with lock:
            try:
                client.images.get(image)
            except docker.errors.ImageNotFound:
                try:
                    client.images.pull(image)
                except docker.errors.APIError as err:
                    raise ProviderError(
                        f"docker image {image!r} is not on the engine and pulling it failed "
                        f"({err.explanation or err}); build it ({SETUP_HINT} builds "
                        f"{DEFAULT_IMAGE}) or pass image= an image present locally"
                    ) from None

    def _launch(self, kwargs: dict[str, Any]) -> tuple[str, Any]:
        """Create, copy the server in, attach, start. Returns (container id, attach socket).

        On failure the container created here is removed before the error propagates.
        """
        import docker.errors

        client = self._docker()
        image = kwargs["image"]
        try:
            container = client.containers.create(**kwargs)
        except docker.errors.ImageNotFound:
            self._ensure_image(image)
            container = client.containers.create(**kwargs)
        sock = None
        try:
            container.put_archive("/", self._server_archive())
            sock = client.api.attach_socket(
                container.id, params={"stdout": 1, "stderr": 1, "stream": 1, "logs": 1}
            )
            container.start()
            return container.id, sock
        except BaseException as err:
            _close_socket(sock)
            _remove(client, container.id)
            if isinstance(err, docker.errors.APIError):
                raise _launch_error(image, err) from None
            raise

    def _wait_ready(self, cid: str, sock: Any, image: str) -> tuple[int, dict[str, Any]]:
        """Read the attach stream until the server's READY line; return (host port, ready info)."""
        from docker.utils.socket import STDOUT, frames_iter

        out, tail = b"", deque(maxlen=30)
        ready: dict[str, Any] | None = None
        try:
            for stream, data in frames_iter(sock, tty=False):
                if stream != STDOUT:
                    tail.extend(data.decode(errors="replace").splitlines())
                    continue
                out += data
                while b"\n" in out:
                    line, out = out.split(b"\n", 1)
                    if line.startswith(_READY):
                        ready = json.loads(line[len(_READY):])
                        break
                    tail.append(line.decode(errors="replace"))
                if ready is not None:
                    break
        finally:
            _close_socket(sock)
        if ready is None:
            state = _exit_state(self._docker(), cid)
            logs = "\n".join(tail) or "(no output)"
            if "exit code 127" in state or "exec python3 failed" in logs:
                raise ProviderError(
                    f"docker: image {image!r} has no python3 (the sandbox server needs python3 "
                    f">= 3.9 on PATH in the image; {DEFAULT_IMAGE} has it). Output:\n{logs}"
                )
            raise ProviderError(
                f"docker: the sandbox server in image {image!r} exited before it was ready "
                f"({state}); it needs python3 >= 3.9 in the image. Last output:\n{logs}"
            )
        info = self._docker().api.inspect_container(cid)
        bindings = (info["NetworkSettings"]["Ports"] or {}).get(f"{_PORT}/tcp") or []
        if not bindings:
            raise ProviderError(f"docker: container {cid[:12]} has no published port {_PORT}")
        return int(bindings[0]["HostPort"]), ready

    def _cleanup(
        self, sandbox_id: str, cid: str | None, launching: concurrent.futures.Future[Any] | None
    ) -> None:
        """Remove the sandbox's container, whatever state acquire reached (runs in a thread)."""
        if launching is not None:
            concurrent.futures.wait([launching])
            if cid is None and not launching.cancelled() and launching.exception() is None:
                cid = launching.result()[0]
                _close_socket(launching.result()[1])
        client = self._docker()
        if cid is not None:
            _remove(client, cid)
            return
        # Never got an id (interrupted create, lost response): find it by the label set before.
        for container in client.containers.list(
            all=True, filters={"label": f"{LABEL}.sandbox_id={sandbox_id}"}
        ):
            _remove(client, container.id)

    def _kill(self, cid: str) -> None:
        import docker.errors

        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            self._docker().api.kill(cid)

    # ----------------------------------------------------------------- provider API
    def sandbox(self, config: RuntimeConfig) -> contextlib.AbstractAsyncContextManager[Endpoint]:
        """Start a container running the server; yield its endpoint; remove it on every path."""
        config = self.check(config)
        return self._sandbox(config)

    @contextlib.asynccontextmanager
    async def _sandbox(self, config: RuntimeConfig) -> AsyncIterator[Endpoint]:
        sandbox_id = f"docker-{secrets.token_hex(6)}"
        token = secrets.token_urlsafe(32)
        image = config.image or self.image
        kwargs = self._create_kwargs(config, sandbox_id, token)
        loop = asyncio.get_running_loop()
        launching: concurrent.futures.Future[tuple[str, Any]] | None = None
        cid: str | None = None
        kill_handle: asyncio.TimerHandle | None = None
        started = time.monotonic()
        try:
            try:
                async with asyncio.timeout(config.limits.startup_timeout_s or _DEFAULT_STARTUP_S):
                    launching = self._submit(self._launch, kwargs)
                    cid, sock = await asyncio.wrap_future(launching)
                    port, ready = await self._call(self._wait_ready, cid, sock, image)
            except TimeoutError as err:
                phase = "waiting for the server's READY line" if cid else "creating the container"
                raise ProviderError(
                    f"docker: sandbox {sandbox_id} not ready within startup_timeout_s="
                    f"{config.limits.startup_timeout_s} ({phase}; image {image!r})"
                ) from err
            run_timeout = config.limits.run_timeout_s
            if run_timeout is not None:
                kill_handle = loop.call_later(run_timeout, self._submit, self._kill, cid)
            yield Endpoint(
                url=f"tcp://{self.connect_host}:{port}",
                token=token,
                sandbox_id=sandbox_id,
                provider=self.name,
                config=config.merge({"image": image}),
                meta={
                    "container_id": cid,
                    "container_name": kwargs["name"],
                    "image": image,
                    "host_port": port,
                    "server_pid": ready.get("pid"),
                    "acquire_s": round(time.monotonic() - started, 4),
                },
            )
        finally:
            if kill_handle is not None:
                kill_handle.cancel()
            # Runs to completion in its thread even if this task is cancelled again.
            cleanup = self._submit(self._cleanup, sandbox_id, cid, launching)
            # A second cancel stops the wait, not the removal (pool threads finish even at exit).
            await asyncio.shield(asyncio.wrap_future(cleanup))

    async def live_sandboxes(self) -> list[str]:
        """Sandbox ids of this owner's containers (any session, any state) the engine still has."""
        return [sid for sid, _ in await self._call(self._list, False)]

    async def reap(
        self, sandbox_ids: list[str] | None = None, *, session_only: bool = False
    ) -> list[str]:
        """Force-remove this owner's containers (all, or ``sandbox_ids``); return ids removed."""
        found = await self._call(self._list, session_only)
        chosen = [(sid, cid) for sid, cid in found if sandbox_ids is None or sid in sandbox_ids]
        client = await self._call(self._docker)
        await asyncio.gather(*(self._call(_remove, client, cid) for _, cid in chosen))
        return [sid for sid, _ in chosen]

    def _list(self, session_only: bool) -> list[tuple[str, str]]:
        labels = [f"{LABEL}=1", f"{LABEL}.owner={self.owner}"]
        if session_only:
            labels.append(f"{LABEL}.session={self.session_id}")
        containers = self._docker().containers.list(all=True, filters={"label": labels})
        return [(c.labels.get(f"{LABEL}.sandbox_id", c.name), c.id) for c in containers]

    async def aclose(self) -> None:
        """Close the SDK client and the thread pool."""
        client, pool = self._client, self._pool
        self._client = self._pool = None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
        if pool is not None:
            pool.shutdown(wait=False)

    @classmethod
    def availability(cls) -> Availability:
        """Available when the SDK imports, the engine answers and the default image exists."""
        try:
            import docker
            import docker.errors
        except ImportError:
            return Availability(False, "the docker SDK is missing: pip install 'sandboxnb[docker]'")
        where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        try:
            client = docker.from_env(timeout=5)
        except docker.errors.DockerException as err:
            return Availability(False, f"no Docker engine answers at {where} ({err}); {SETUP_HINT}")
        try:
            client.ping()
            try:
                client.images.get(DEFAULT_IMAGE)
            except docker.errors.ImageNotFound:
                return Availability(
                    False, f"the default image {DEFAULT_IMAGE} is missing; {SETUP_HINT} to build it"
                )
        except Exception as err:
            return Availability(False, f"no Docker engine answers at {where} ({err}); {SETUP_HINT}")
        finally:
            client.close()
        return Availability(True, f"engine at {where}, image {DEFAULT_IMAGE}")


# --------------------------------------------------------------------- module helpers
def _remove(client: Any, cid: str) -> None:
    """``docker rm -f`` that tolerates a container already gone or being auto-removed."""
    import docker.errors

    try:
        client.api.remove_container(cid, force=True)
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as err:
        if "already in progress" not in str(err):
            raise
        # The engine is auto-removing it (the server exited): wait until it is really gone.
        with contextlib.suppress(Exception):  # NotFound once gone; a read timeout if stuck
            client.api.wait(cid, timeout=30, condition="removed")


def _close_socket(sock: Any) -> None:
    if sock is None:
        return
    response = getattr(sock, "_response", None)
    for closer in (getattr(sock, "_sock", None), sock, response):
        if closer is not None:
            with contextlib.suppress(Exception):
                if isinstance(closer, socket.socket):
                    closer.shutdown(socket.SHUT_RDWR)
                closer.close()


def _exit_state(client: Any, cid: str) -> str:
    import docker.errors

    try:
        state = client.api.inspect_container(cid)["State"]
    except docker.errors.NotFound:
        return "container gone"
    return f"exit code {state.get('ExitCode')}, {state.get('Error') or state.get('Status')}"


def _launch_error(image: str, err: Any) -> ProviderError:
    text = str(getattr(err, "explanation", None) or err)
    if "executable file not found" in text or "no such file or directory" in text:
        return ProviderError(
            f"docker: image {image!r} has no python3 (the sandbox server needs python3 >= 3.9 "
            f"on PATH in the image); engine said: {text}"
        )
    if "could not select device driver" in text:
        return ProviderError(
            f"docker: resources.gpu asks for GPUs but this engine has no GPU device driver "
            f"(install the NVIDIA Container Toolkit, or drop gpu); engine said: {text}"
        )
    return ProviderError(f"docker: could not start a container from {image!r}: {text}")
