"""The ``modal`` provider: one Modal Sandbox per acquisition, its server behind a TLS tunnel.

The entrypoint is a ``python3 -c`` bootstrap that unpacks the server zipapp (shipped compressed in
its arguments) and execs it, so any image with ``python3`` >= 3.9 works; the token travels in the
environment. A plain tunnel (``unencrypted_ports``, deprecated by Modal) only with
``encrypted=False``. Images: a registry reference, ``modal://NAME[:TAG]`` (``Image.publish``),
``im-...`` or a ``modal.Image``, each resolved once per provider. ``memory_mb`` is both request and
hard limit; ``gpu`` is ``"TYPE[:N]"``; ``idle_timeout_s`` is also Modal's ``idle_timeout``. Tags are
the spec's labels as they are (Modal takes any tag key).

Modal caps a sandbox's lifetime (``timeout``, counted from create): it is ``startup_timeout_s +
run_timeout_s``, so the base's run timeout (counted from ready) decides and the cap is the
backstop when the kernel dies; with ``run_timeout_s = None`` it is Modal's maximum, 24 h.

Transient faults (:mod:`.retry`): RESOURCE_EXHAUSTED (unless it names a quota) is a throttle;
UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, UNKNOWN, CANCELLED, ABORTED and connection errors (what
the SDK's own three retries gave up on) are uncertain; everything else is permanent. The SDK
repeats a reset create on its own, so each create is followed by a sweep (in the background) of
other sandboxes carrying the same sandbox id label.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import lzma
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, NoReturn

from sandboxnb.bundle import bundle_bytes
from sandboxnb.config import RuntimeConfig
from sandboxnb.errors import ConfigError, ProviderError, UnsupportedFieldError
from sandboxnb.providers import retry
from sandboxnb.providers.base import LABEL, Availability, Found, LaunchSpec, Provider
from sandboxnb.providers.modal_sdk import PUBLISHED_PREFIX, ModalSession, availability, is_image
from sandboxnb.providers.spec import SERVER_BUNDLE_NAME

__all__ = ["DEFAULT_IMAGE", "KNOWN_GPUS", "MAX_TIMEOUT_S", "ModalProvider", "ModalSandbox"]

log = logging.getLogger("sandboxnb.providers.modal")

DEFAULT_IMAGE = "python:3.11-slim"
#: GPU types Modal schedules (case-insensitive); ``"TYPE:N"`` asks for N of them.
KNOWN_GPUS = frozenset({"ANY", "T4", "L4", "A10", "A10G", "A100", "A100-40GB", "A100-80GB",
                        "L40S", "H100", "H100!", "H200", "B200", "B200+", "RTX-PRO-6000"})
MAX_GPU_COUNT = 8
MAX_TIMEOUT_S = 24 * 3600  # Modal's longest sandbox lifetime
_PORT = 7000
_POLL_EVERY_S = 0.2
_CHUNK = 96 * 1024  # one argv string stays well below the kernel's 128 KiB per-argument cap
# Runs in the sandbox as `python3 -c BOOT N CHUNK1..CHUNKN SERVER-ARGS...`: unpack, then exec.
_BOOT = ("import base64,lzma,os,sys\n"
         "n=int(sys.argv[1]);d=os.path.join(os.environ.get('TMPDIR') or '/tmp',"
         "'sandboxnb-%d'%os.getpid());os.makedirs(d,exist_ok=True)\n"
         f"p=os.path.join(d,{SERVER_BUNDLE_NAME!r})\n"
         "open(p,'wb').write(lzma.decompress(base64.b64decode(''.join(sys.argv[2:2+n]))))\n"
         "x=sys.executable or 'python3';os.execv(x,[x,p]+sys.argv[2+n:])\n")


def _compress(data: bytes) -> bytes:
    """xz at its strongest: the bundle must fit Modal's 64 KiB command with room to spare
    (about 16% smaller than zlib's best on it); every CPython build Modal runs has ``lzma``."""
    return lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)


@functools.cache
def _bootstrap() -> tuple[str, ...]:
    blob = base64.b64encode(_compress(bundle_bytes())).decode()
    chunks = [blob[i:i + _CHUNK] for i in range(0, len(blob), _CHUNK)]
    return ("python3", "-c", _BOOT, str(len(chunks)), *chunks)


@dataclass
class ModalSandbox:
    """The handle: the SDK's sandbox, its app, its tunnel, what acquiring it took."""

    sb: Any
    app_id: str
    sandbox_id: str = ""
    tunnel: dict[str, Any] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)
    next_poll: float = 0.0


class ModalProvider(Provider):
    """Options: ``app_name`` (created if missing), ``image``, ``environment_name``,
    ``encrypted`` (TLS tunnel), ``region``, ``cloud``, ``env`` (extra sandbox environment),
    ``tags`` (extra tags), ``session_id``, ``token_id``/``token_secret`` (else the SDK's own)."""

    name: ClassVar[str] = "modal"
    supported: ClassVar[frozenset[str]] = frozenset(
        {"image", "resources.cpu", "resources.memory_mb", "resources.gpu", "limits"})
    description: ClassVar[str] = "a Modal Sandbox per rollout, reached through a TLS tunnel"
    transport: ClassVar[str] = "tls tunnel (tcp tunnel with encrypted=False)"

    def __init__(self, *, app_name: str = "sandboxnb", image: Any = None,
                 environment_name: str | None = None, encrypted: bool = True,
                 region: str | None = None, cloud: str | None = None,
                 env: dict[str, str] | None = None, tags: dict[str, str] | None = None,
                 session_id: str | None = None, token_id: str | None = None,
                 token_secret: str | None = None) -> None:
        if not app_name or not isinstance(app_name, str):
            raise ConfigError(f"modal app_name = {app_name!r}: expected a non-empty string")
        if image is not None and not (isinstance(image, str) and image) and not is_image(image):
            raise ConfigError(f"modal image = {image!r}: expected a registry reference "
                              f"('python:3.11-slim'), '{PUBLISHED_PREFIX}NAME', an image id "
                              "'im-...' or a modal.Image")
        if bool(token_id) != bool(token_secret):
            raise ConfigError("modal token_id/token_secret: give both or neither")
        self.app_name, self.image, self.encrypted = app_name, image, bool(encrypted)
        self.region, self.cloud = region, cloud
        self.env, self.extra_tags = dict(env or {}), dict(tags or {})
        if session_id:
            self.session_id = session_id
        self.sdk = ModalSession(app_name, environment_name,
                                (token_id, token_secret) if token_id and token_secret else None)
        self._unsent: set[str] = set()  # sandbox ids whose create failed before its RPC
        self._sweeps: set[asyncio.Task[None]] = set()

    @classmethod
    def availability(cls) -> Availability:
        return availability()

    def prepare(self, config: RuntimeConfig) -> RuntimeConfig:
        gpu, run = config.resources.gpu, config.limits.run_timeout_s
        if gpu is not None and gpu.type.upper() not in KNOWN_GPUS:
            _refuse("resources.gpu.type", gpu.type,
                    f"{', '.join(sorted(KNOWN_GPUS))} (optionally 'TYPE:N')")
        if gpu is not None and gpu.count > MAX_GPU_COUNT:
            _refuse("resources.gpu.count", gpu.count, f"1..{MAX_GPU_COUNT}")
        if run is not None and run > MAX_TIMEOUT_S:
            _refuse("limits.run_timeout_s", run, f"up to {MAX_TIMEOUT_S} (Modal's maximum)")
        if config.image is None and not is_image(self.image):
            config = config.merge({"image": self.image or DEFAULT_IMAGE})
        return config

    # -- hooks ------------------------------------------------------------------------------
    async def create(self, spec: LaunchSpec) -> ModalSandbox:
        import modal

        started = time.perf_counter()
        try:
            client, app = await self.sdk.open()
            image = await self.sdk.image(spec.config.image or self.image or DEFAULT_IMAGE)
        except BaseException:
            self._unsent.add(spec.sandbox_id)  # nothing was created: release need not look
            raise
        res, lim = spec.config.resources, spec.config.limits
        run = lim.run_timeout_s
        kwargs: dict[str, Any] = {
            "timeout": MAX_TIMEOUT_S if run is None
            else min(MAX_TIMEOUT_S, math.ceil(run + (lim.startup_timeout_s or 0))),
            "env": {**self.env, **spec.server_env(), "PYTHONUNBUFFERED": "1"},
            "tags": {**self.extra_tags, **spec.labels},
            ("encrypted_ports" if self.encrypted else "unencrypted_ports"): [_PORT],
            "idle_timeout": lim.idle_timeout_s and max(1, math.ceil(lim.idle_timeout_s)),
            "cpu": res.cpu and float(res.cpu),
            "memory": res.memory_mb and (res.memory_mb, res.memory_mb),
            "gpu": res.gpu and str(res.gpu), "region": self.region, "cloud": self.cloud,
        }
        listen = ["--host", "0.0.0.0", "--port", str(_PORT)]
        sent = time.perf_counter()
        try:
            sb = await modal.Sandbox.create.aio(
                *_bootstrap(), *spec.server_args(listen=listen), app=app, image=image,
                client=client, **{k: v for k, v in kwargs.items() if v is not None})
        except modal.exception.Error as err:
            raise ProviderError(f"modal: Sandbox.create failed ({type(err).__name__}: {err})"
                                ) from err
        self._unsent.discard(spec.sandbox_id)  # an earlier attempt's mark must not hide it
        sweep = asyncio.ensure_future(self._sweep(spec.sandbox_id, sb.object_id))
        self._sweeps.add(sweep)
        sweep.add_done_callback(self._sweeps.discard)
        return ModalSandbox(sb, app.app_id, spec.sandbox_id,
                            phases={"setup_s": sent - started,
                                    "create_s": time.perf_counter() - sent})

    async def _sweep(self, sandbox_id: str, keep: str) -> None:
        """Terminate copies of ``sandbox_id`` other than ``keep`` (the SDK's own retry of a
        reset create can leave one behind)."""
        try:
            found = await self.list_sandboxes({f"{LABEL}.sandbox_id": sandbox_id})
            for extra in found:
                if extra.handle.sb.object_id != keep:
                    log.warning("modal: sandbox %s had a duplicate (%s) from a retried create; "
                                "terminating it", sandbox_id, extra.handle.sb.object_id)
                    await self.destroy(extra.handle)
                    self.retry_stats.duplicates_removed += 1
        except Exception:
            log.exception("modal: checking sandbox %s for duplicates failed; `sandboxnb gc` finds "
                          "any left", sandbox_id)

    def classify(self, err: Exception) -> retry.Fault | None:
        return _classify(err)

    async def adopt(self, found: Found, spec: LaunchSpec) -> ModalSandbox:
        handle: ModalSandbox = found.handle
        return handle

    async def address(self, handle: ModalSandbox) -> str:
        started = time.perf_counter()
        tunnel = (await handle.sb.tunnels.aio())[_PORT]
        host, port = (tunnel.host, tunnel.port) if self.encrypted else tunnel.tcp_socket
        handle.tunnel = {"host": host, "port": port}
        handle.phases["tunnels_s"] = time.perf_counter() - started
        return f"{'tls' if self.encrypted else 'tcp'}://{host}:{port}"

    async def failure(self, handle: ModalSandbox) -> str | None:
        if time.monotonic() < handle.next_poll:
            return None
        handle.next_poll = time.monotonic() + _POLL_EVERY_S
        if (code := await handle.sb.poll.aio()) is None:
            return None
        return (f"Modal sandbox {handle.sb.object_id} exited with code {code} before its server "
                "answered (the image needs python3 >= 3.9 on PATH; 127 means no python3)")

    def endpoint_meta(self, handle: ModalSandbox) -> dict[str, Any]:
        return {"modal_id": handle.sb.object_id, "app_id": handle.app_id,
                "encrypted": self.encrypted, "tunnel": dict(handle.tunnel),
                "phases": {k: round(v, 4) for k, v in handle.phases.items()}}

    async def destroy(self, handle: ModalSandbox) -> None:
        import modal

        await retry.destroy(self, handle.sandbox_id or handle.sb.object_id,
                            handle.sb.terminate.aio, gone=(modal.exception.NotFoundError,))

    async def list_sandboxes(self, labels: Mapping[str, str]) -> list[Found]:
        import modal

        wanted = labels.get(f"{LABEL}.sandbox_id")
        if wanted in self._unsent:
            self._unsent.discard(wanted)
            return []
        client, app = await self.sdk.open()

        async def listing() -> list[Found]:
            found = []
            async for sb in modal.Sandbox.list.aio(app_id=app.app_id, tags=dict(labels),
                                                   client=client):
                tags = dict(labels) if wanted else await sb.get_tags.aio()
                sid = tags.get(f"{LABEL}.sandbox_id", sb.object_id)
                found.append(Found(sid, ModalSandbox(sb, app.app_id, sid), tags))
            return found

        return await retry.call(self, "list sandboxes", listing)

    async def aclose(self) -> None:
        await super().aclose()
        if self._sweeps:
            await asyncio.gather(*self._sweeps, return_exceptions=True)
        await self.sdk.close()


#: gRPC codes the SDK gave up retrying, after which a create may or may not have happened.
_UNCERTAIN_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL", "UNKNOWN",
                              "CANCELLED", "ABORTED"})


def _classify(err: BaseException) -> retry.Fault | None:
    """Modal's transient errors (found on ``err`` or its causes), else ``None``."""
    import modal
    from grpclib import GRPCError
    from grpclib.exceptions import StreamTerminatedError

    seen: BaseException | None = err
    while seen is not None:
        status = getattr(seen, "_grpc_status", None)
        if status is None and isinstance(seen, GRPCError):
            status = seen.status
        if status is not None:
            name = getattr(status, "name", str(status))
            if name == "RESOURCE_EXHAUSTED":
                message = str(getattr(seen, "_grpc_message", "") or seen)
                return None if "quota" in message.lower() else retry.Fault(retry.Kind.THROTTLED)
            return retry.Fault(retry.Kind.UNCERTAIN) if name in _UNCERTAIN_CODES else None
        if isinstance(seen, modal.exception.ConnectionError | OSError | StreamTerminatedError
                      | TimeoutError):
            return retry.Fault(retry.Kind.UNCERTAIN)
        seen = seen.__cause__
    return None


def _refuse(field_name: str, value: Any, accepted: str) -> NoReturn:
    raise UnsupportedFieldError("modal", field_name, value, (), message=(
        f"modal does not support {field_name} = {value!r}; accepted: {accepted}"))
