"""Docker provider: one fresh ``--rm`` container per sandbox, on a local engine or ``DOCKER_HOST``.

Any image with ``python3`` (>= 3.9) works: the server zipapp is copied in before the container
starts. It listens on port :data:`PORT` inside, published on ``127.0.0.1`` (an ephemeral host
port). The synchronous ``docker`` SDK runs in the provider's own threads, never on the loop.
``cpu`` -> ``--cpus``, ``memory_mb`` -> ``--memory`` (swap included: a hard cap), ``gpu`` ->
``--gpus N`` (a count only: Docker cannot select a GPU model).

Transient faults (:mod:`.retry`): 429 is a throttle; 5xx, connection errors and a 409 on create
(a container of that name exists: an earlier attempt did happen) are uncertain; a container found
after an uncertain create is replaced (it may never have been started); other errors are
permanent.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

from sandboxnb.config import RuntimeConfig
from sandboxnb.errors import ConfigError, ProviderError, UnsupportedFieldError
from sandboxnb.providers import retry
from sandboxnb.providers.base import LABEL, Availability, Found, LaunchSpec, Provider
from sandboxnb.providers.docker_engine import (
    DEFAULT_IMAGE,
    SERVER,
    SETUP_HINT,
    Container,
    close_socket,
    engine_availability,
    launch_error,
    remove_container,
    server_archive,
    watch_output,
)

__all__ = ["BUSYBOX_IMAGE", "DEFAULT_IMAGE", "LABEL", "DockerProvider"]

#: A python-less image built by ``scripts/setup-docker`` (for negative checks).
BUSYBOX_IMAGE = os.environ.get("SANDBOXNB_BUSYBOX_IMAGE", "sandboxnb/busybox:latest")
PORT = 7000  # the server's port inside every container
_T = TypeVar("_T")


def _gpu_count(config: RuntimeConfig) -> int | None:
    """The GPU count Docker can honour, or ``None``; raises for a GPU model."""
    gpu = config.resources.gpu
    if gpu is None:
        return None
    kind = gpu.type.strip().lower()
    if kind in ("any", "gpu", "nvidia"):
        return gpu.count
    if kind.isdigit() and gpu.count == 1:  # "gpu: 2" parses as type "2"
        return int(kind)
    raise UnsupportedFieldError(
        "docker", "resources.gpu.type", gpu.type, ["resources.gpu count"],
        message=f"docker does not support resources.gpu.type (got {gpu.type!r} in gpu="
        f"{str(gpu)!r}): Docker selects GPUs by count only; accepted: a count such as gpu='2' "
        f"or gpu='any:{gpu.count}' (use a cloud provider to pick a GPU model)")


class DockerProvider(Provider):
    """Sandboxes as Docker containers. ``image`` is the default (a config's wins); ``base_url``
    defaults to ``DOCKER_HOST`` or the local socket; ``bind_host``/``connect_host`` are where the
    port is published and reached; ``env``/``labels`` are added to every container; ``pull``
    pulls a missing image; ``max_workers`` threads make the SDK calls."""

    name: ClassVar[str] = "docker"
    supported: ClassVar[frozenset[str]] = frozenset(
        {"image", "resources.cpu", "resources.memory_mb", "resources.gpu", "limits"})
    description: ClassVar[str] = "a fresh Docker container per sandbox (local or DOCKER_HOST)"
    transport: ClassVar[str] = "tcp to a port published on 127.0.0.1"

    def __init__(self, *, image: str = DEFAULT_IMAGE, base_url: str | None = None,
                 network: str = "bridge", bind_host: str = "127.0.0.1",
                 connect_host: str = "127.0.0.1", pids_limit: int | None = 4096,
                 init: bool = True, pull: bool = True, env: dict[str, str] | None = None,
                 labels: dict[str, str] | None = None, max_workers: int = 64,
                 session_id: str | None = None, api_timeout_s: float = 120.0) -> None:
        if not image:
            raise ConfigError(f"docker image = {image!r}: expected a name like {DEFAULT_IMAGE!r}")
        if network in ("none", "host"):
            raise ConfigError(
                f"docker network = {network!r}: the server port must be published; accepted: "
                "'bridge' or a user-defined network name (use an --internal network to cut egress)")
        if max_workers < 2:
            raise ConfigError(f"docker max_workers = {max_workers!r}: expected an int >= 2")
        self.image, self.base_url, self.network = image, base_url, network
        self.bind_host, self.connect_host = bind_host, connect_host
        self.pids_limit, self.init, self.pull = pids_limit, init, pull
        self.env, self.extra_labels = dict(env or {}), dict(labels or {})
        self.max_workers, self.api_timeout_s = max_workers, api_timeout_s
        if session_id:
            self.session_id = session_id
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._client: Any = None
        self._lock = threading.Lock()

    async def _call(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run an SDK call in the provider's threads."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.max_workers,
                                                               "sandboxnb-docker")
        return await asyncio.wrap_future(self._pool.submit(fn, *args))

    def _docker(self) -> Any:
        """The shared SDK client (created on first use, in a worker thread)."""
        with self._lock:
            if self._client is None:
                import docker

                opts = {"timeout": self.api_timeout_s, "max_pool_size": self.max_workers + 4}
                self._client = (docker.DockerClient(base_url=self.base_url, **opts)
                                if self.base_url else docker.from_env(**opts))
            return self._client

    # -- hooks ------------------------------------------------------------------------------
    def prepare(self, config: RuntimeConfig) -> RuntimeConfig:
        _gpu_count(config)  # a GPU model fails before anything starts
        return config if config.image else config.merge({"image": self.image})

    def run_kwargs(self, spec: LaunchSpec) -> dict[str, Any]:
        """What ``containers.create`` gets for ``spec``."""
        res, listen = spec.config.resources, ["--host", "0.0.0.0", "--port", str(PORT)]
        kwargs: dict[str, Any] = {
            "image": spec.config.image or self.image, "name": f"sandboxnb-{spec.sandbox_id}",
            "command": ["python3", SERVER, *spec.server_args(listen=listen)],
            "labels": {**self.extra_labels, **spec.labels},
            "environment": {**self.env, **spec.server_env(), "PYTHONUNBUFFERED": "1"},
            "ports": {f"{PORT}/tcp": (self.bind_host, None)}, "network": self.network,
            "auto_remove": True, "init": self.init, "detach": True,
        }
        if self.pids_limit:
            kwargs["pids_limit"] = self.pids_limit
        if res.cpu is not None:
            kwargs["nano_cpus"] = int(res.cpu * 1e9)
        if res.memory_mb is not None:
            kwargs["mem_limit"] = kwargs["memswap_limit"] = f"{res.memory_mb}m"
        if gpus := _gpu_count(spec.config):  # what `--gpus N` sends
            kwargs["device_requests"] = [{"count": gpus, "capabilities": [["gpu"]]}]
        return kwargs

    async def create(self, spec: LaunchSpec) -> Container:
        return await self._call(self._create, spec)

    def _create(self, spec: LaunchSpec) -> Container:
        """Create, copy the server in, attach to its output, start. (A container that fails to
        start is found again by its labels and destroyed by the base.)"""
        import docker.errors

        client, kwargs, sock = self._docker(), self.run_kwargs(spec), None
        try:
            try:
                made = client.containers.create(**kwargs)
            except docker.errors.ImageNotFound:
                self._pull(kwargs["image"])
                made = client.containers.create(**kwargs)
            made.put_archive("/", server_archive())
            sock = client.api.attach_socket(made.id, params={"stdout": 1, "stderr": 1,
                                                             "stream": 1, "logs": 1})
            box, started = Container(spec.sandbox_id, made.id, kwargs["image"]), time.time()
            made.start()
        except BaseException as err:
            close_socket(sock)
            if isinstance(err, docker.errors.APIError):
                raise launch_error(kwargs["image"], err) from err
            raise
        threading.Thread(target=watch_output, args=(client, box, sock, started),
                         daemon=True).start()
        return box

    def _pull(self, image: str) -> None:  # the engine merges concurrent pulls of one image
        import docker.errors

        hint = f"build it ({SETUP_HINT} builds {DEFAULT_IMAGE})"
        if not self.pull:
            raise ProviderError(f"docker image {image!r} is not on the engine and pull=False; "
                                f"{hint} or `docker pull {image}`")
        try:
            self._docker().images.pull(image)
        except docker.errors.APIError as err:
            raise ProviderError(
                f"docker image {image!r} is not on the engine and pulling it failed "
                f"({err.explanation or err}); {hint} or pass image= a local image") from None

    async def address(self, box: Container) -> str:
        ports = await self._call(self._ports, box.cid)
        if not ports.get(f"{PORT}/tcp"):  # it is no longer running
            await self._call(box.ended.wait, 10.0)
            reason = await self.failure(box) or f"it has no published port {PORT}"
            raise ProviderError(f"docker: sandbox {box.sandbox_id} will not become ready: "
                                f"{reason}")
        box.host_port = int(ports[f"{PORT}/tcp"][0]["HostPort"])
        return f"tcp://{self.connect_host}:{box.host_port}"

    async def failure(self, box: Container) -> str | None:
        if not box.ended.is_set():
            return None
        logs, code = "\n".join(box.tail) or "(no output)", box.exit_code
        if code == 127 or "exec python3 failed" in logs:
            return (f"image {box.image!r} has no python3 (the sandbox server needs python3 >= "
                    f"3.9 on PATH in the image; {DEFAULT_IMAGE} has it). Output:\n{logs}")
        return (f"the server in image {box.image!r} exited before it was ready (container "
                f"exit code {'unknown' if code is None else code}); it needs python3 >= 3.9. "
                f"Last output:\n{logs}")

    def endpoint_meta(self, box: Container) -> dict[str, Any]:
        return {"container_id": box.cid, "container_name": f"sandboxnb-{box.sandbox_id}",
                "image": box.image, "host_port": box.host_port}

    def classify(self, err: Exception) -> retry.Fault | None:
        return _classify(err)

    async def destroy(self, box: Container) -> None:
        box.destroyed = True  # its watcher need not ask why it stopped
        await retry.destroy(self, box.sandbox_id,
                            lambda: self._call(remove_container, self._docker(), box.cid))

    async def list_sandboxes(self, labels: Mapping[str, str]) -> list[Found]:
        filters = {"label": [f"{key}={value}" for key, value in labels.items()]}
        found = await retry.call(self, "list sandboxes", lambda: self._call(
            lambda: self._docker().api.containers(all=True, filters=filters)))
        return [Found(sid, Container(sid, c["Id"]), c["Labels"]) for c in found
                for sid in [c["Labels"].get(f"{LABEL}.sandbox_id", c["Id"])]]

    @classmethod
    def availability(cls) -> Availability:
        """Available when the SDK imports, the engine answers and the default image exists."""
        return engine_availability()

    async def aclose(self) -> None:
        await super().aclose()
        client, pool, self._client, self._pool = self._client, self._pool, None, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
        if pool is not None:
            pool.shutdown(wait=False)

    # -- engine calls, in worker threads ------------------------------------------------------
    def _ports(self, cid: str) -> dict[str, Any]:
        import docker.errors

        with contextlib.suppress(docker.errors.NotFound):
            return self._docker().api.inspect_container(cid)["NetworkSettings"]["Ports"] or {}
        return {}



def _classify(err: BaseException) -> retry.Fault | None:
    """The engine's transient errors (found on ``err`` or its causes), else ``None``."""
    import docker.errors
    import requests

    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, docker.errors.APIError) and seen.status_code is not None:
            code, text = seen.status_code, str(seen.explanation or seen)
            if code == 429:
                return retry.Fault(retry.Kind.THROTTLED,
                                   retry.retry_after_s(getattr(seen.response, "headers", None)))
            if "executable file not found" in text or "no such file or directory" in text:
                return None  # the image lacks python3: no retry helps
            if code == 409 or code >= 500:
                return retry.Fault(retry.Kind.UNCERTAIN)
            return None
        if isinstance(seen, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
            return retry.Fault(retry.Kind.UNCERTAIN)
        seen = seen.__cause__
    return None
