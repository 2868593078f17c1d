"""Modal provider: one fresh Modal Sandbox per acquisition, reached through an encrypted tunnel.

The sandbox's entrypoint is a tiny ``python3 -c`` bootstrap that unpacks the stdlib-only sandbox
server (shipped compressed in its arguments) and execs it, so any image with ``python3`` >= 3.9
works and nothing of sandboxnb is installed in the image. The per-sandbox token travels in the
sandbox's environment (never on argv). The server port is exposed through a TLS tunnel
(``encrypted_ports``); a plain TCP tunnel (``unencrypted_ports``, deprecated by Modal) is used
only with ``encrypted=False``.

Images (provider option ``image`` or a config's ``image``): a registry reference such as
``"python:3.11-slim"``, ``"modal://NAME[:TAG]"`` for an image published with ``Image.publish``,
``"im-..."`` for an image id, or a ``modal.Image`` object (built lazily). Each image is resolved
once per provider, behind a lock, so concurrent first rollouts never race a build.

Resources: ``cpu`` -> ``cpu`` (cores), ``memory_mb`` -> ``memory=(MiB, MiB)`` (request and hard
limit), ``gpu`` -> ``gpu="TYPE[:N]"``. Limits: ``run_timeout_s`` -> ``timeout`` (default
``default_timeout_s``), ``idle_timeout_s`` -> ``idle_timeout`` and the server's dead-man switch,
``startup_timeout_s`` bounds acquire. Every sandbox carries the tags ``sandboxnb=1``, ``session``,
``owner``, ``created`` and ``acquisition``; an interrupted create is found by its acquisition tag
and terminated. Credentials come the SDK's way: ``MODAL_TOKEN_ID``/``MODAL_TOKEN_SECRET`` or the
active profile in ``~/.modal.toml`` (``MODAL_CONFIG_PATH``, ``MODAL_PROFILE``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import os
import secrets
import ssl
import time
import zlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, ClassVar

from sandboxnb.config import ConfigError, RuntimeConfig
from sandboxnb.providers.base import Availability, Endpoint, Provider, ProviderError, owner_label

__all__ = ["DEFAULT_IMAGE", "KNOWN_GPUS", "ModalProvider"]

#: Used when neither the provider nor the config names an image.
DEFAULT_IMAGE = "python:3.11-slim"
#: GPU types Modal schedules (case-insensitive); ``"TYPE:N"`` asks for N of them.
KNOWN_GPUS = frozenset({
    "ANY", "T4", "L4", "A10", "A10G", "A100", "A100-40GB", "A100-80GB", "L40S", "H100", "H100!",
    "H200", "B200", "B200+", "RTX-PRO-6000",
})
MAX_GPU_COUNT = 8
MAX_TIMEOUT_S = 24 * 3600
PUBLISHED_PREFIX = "modal://"
TAG = "sandboxnb"
_PORT = 7000
_DEFAULT_STARTUP_S = 300.0
_CHUNK = 96 * 1024  # one argv string stays well below the kernel's 128 KiB per-argument cap

# Runs in the sandbox as `python3 -c BOOT N CHUNK1..CHUNKN SERVER-ARGS...`: unpack, then exec.
_BOOT = (
    "import base64,os,sys,zlib\n"
    "n=int(sys.argv[1]);t=os.environ.get('TMPDIR') or '/tmp'\n"
    "d=os.path.join(t,'sandboxnb-%d'%os.getpid())\n"
    "os.makedirs(d,exist_ok=True);p=os.path.join(d,'sandboxnb.server.pyz')\n"
    "open(p,'wb').write(zlib.decompress(base64.b64decode(''.join(sys.argv[2:2+n]))))\n"
    "x=sys.executable or 'python3'\n"
    "os.execv(x,[x,p]+sys.argv[2+n:])\n"
)


def _tls_context() -> ssl.SSLContext:
    """Default trust store plus ``SANDBOXNB_TLS_CA_FILE`` (as the sandboxnb client does)."""
    ctx = ssl.create_default_context()
    ca_file = os.environ.get("SANDBOXNB_TLS_CA_FILE")
    if ca_file:
        ctx.load_verify_locations(cafile=ca_file)
    return ctx


def _credentials() -> tuple[str | None, str | None, str]:
    """(token id, token secret, where they came from) as the Modal SDK would resolve them."""
    env_id, env_secret = os.environ.get("MODAL_TOKEN_ID"), os.environ.get("MODAL_TOKEN_SECRET")
    if env_id and env_secret:
        return env_id, env_secret, "MODAL_TOKEN_ID/MODAL_TOKEN_SECRET"
    try:
        from modal.config import config, user_config_path
    except ImportError:
        return None, None, ""
    return config.get("token_id"), config.get("token_secret"), f"profile in {user_config_path}"


class ModalProvider(Provider):
    """Sandboxes as Modal Sandboxes running the sandboxnb server behind a TLS tunnel.

    Options: ``app_name`` (the Modal App sandboxes belong to, created if missing), ``image``
    (see module docstring; a config's ``image`` wins), ``environment_name``, ``encrypted``
    (TLS tunnel; ``False`` only on explicit request), ``default_timeout_s`` (sandbox lifetime
    when ``run_timeout_s`` is unset), ``region``, ``cloud``, ``env`` (extra sandbox
    environment), ``tags`` (extra tags), ``session_id``, ``token_id``/``token_secret`` (override
    the SDK's configuration). The control channel needs the network, so ``block_network`` is not
    offered.
    """

    name: ClassVar[str] = "modal"
    supported: ClassVar[frozenset[str]] = frozenset(
        {"image", "resources.cpu", "resources.memory_mb", "resources.gpu", "limits"}
    )
    description: ClassVar[str] = "a Modal Sandbox per rollout, reached through a TLS tunnel"

    def __init__(
        self,
        *,
        app_name: str = "sandboxnb",
        image: Any = None,
        environment_name: str | None = None,
        encrypted: bool = True,
        default_timeout_s: int = 3600,
        region: str | None = None,
        cloud: str | None = None,
        env: dict[str, str] | None = None,
        tags: dict[str, str] | None = None,
        session_id: str | None = None,
        token_id: str | None = None,
        token_secret: str | None = None,
    ) -> None:
        if not app_name or not isinstance(app_name, str):
            raise ConfigError(f"modal app_name = {app_name!r}: expected a non-empty string")
        if image is not None and not (isinstance(image, str) and image) and not _is_modal_image(
            image
        ):
            raise ConfigError(
                f"modal image = {image!r}: expected a registry reference ('python:3.11-slim'), "
                f"'{PUBLISHED_PREFIX}NAME', an image id 'im-...' or a modal.Image"
            )
        if not isinstance(default_timeout_s, int) or not 0 < default_timeout_s <= MAX_TIMEOUT_S:
            raise ConfigError(
                f"modal default_timeout_s = {default_timeout_s!r}: expected an int in "
                f"1..{MAX_TIMEOUT_S} (seconds)"
            )
        if bool(token_id) != bool(token_secret):
            raise ConfigError("modal token_id/token_secret: give both or neither")
        self.app_name, self.image, self.environment_name = app_name, image, environment_name
        self.encrypted, self.default_timeout_s = bool(encrypted), default_timeout_s
        self.region, self.cloud = region, cloud
        self.env, self.extra_tags = dict(env or {}), dict(tags or {})
        self.session_id = session_id or secrets.token_hex(6)
        self.owner = owner_label()
        self._token = (token_id, token_secret) if token_id else None
        self._client: Any = None
        self._app: Any = None
        self._setup_lock: asyncio.Lock | None = None
        self._image_locks: dict[str, asyncio.Lock] = {}
        self._images: dict[str, Any] = {}
        self._bootstrap: list[str] | None = None

    # ----------------------------------------------------------------- config
    def check(self, config: RuntimeConfig) -> RuntimeConfig:
        """Reject unsupported fields, unknown GPU types and out-of-range limits up front."""
        config = super().check(config)
        gpu = config.resources.gpu
        if gpu is not None:
            if gpu.type.upper() not in KNOWN_GPUS:
                raise ConfigError(
                    f"modal resources.gpu.type = {gpu.type!r} is not a Modal GPU type; accepted: "
                    f"{', '.join(sorted(KNOWN_GPUS))} (optionally 'TYPE:N')"
                )
            if gpu.count > MAX_GPU_COUNT:
                raise ConfigError(
                    f"modal resources.gpu.count = {gpu.count}: accepted 1..{MAX_GPU_COUNT}"
                )
        run = config.limits.run_timeout_s
        if run is not None and run > MAX_TIMEOUT_S:
            raise ConfigError(
                f"modal limits.run_timeout_s = {run:g}: Modal sandboxes live at most "
                f"{MAX_TIMEOUT_S} s; accepted: 1..{MAX_TIMEOUT_S}"
            )
        return config

    def tags_for(self, acquisition: str) -> dict[str, str]:
        """The tags a sandbox of one acquisition carries."""
        return {
            **self.extra_tags,
            TAG: "1",
            "session": self.session_id,
            "owner": self.owner,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "acquisition": acquisition,
        }

    def _entrypoint(self, config: RuntimeConfig, sandbox_name: str) -> list[str]:
        if self._bootstrap is None:
            from sandboxnb.server import bundle_bytes

            blob = base64.b64encode(zlib.compress(bundle_bytes(), 9)).decode()
            chunks = [blob[i:i + _CHUNK] for i in range(0, len(blob), _CHUNK)]
            self._bootstrap = ["python3", "-c", _BOOT, str(len(chunks)), *chunks]
        lim = config.limits
        args = [
            "--host", "0.0.0.0", "--port", str(_PORT), "--sandbox-id", sandbox_name,
            "--startup-timeout", f"{lim.startup_timeout_s or _DEFAULT_STARTUP_S:g}",
        ]
        if lim.idle_timeout_s is not None:
            args += ["--idle-timeout", f"{lim.idle_timeout_s:g}"]
        return [*self._bootstrap, *args]

    def _create_kwargs(self, config: RuntimeConfig, acquisition: str, token: str) -> dict[str, Any]:
        res, lim = config.resources, config.limits
        timeout = math.ceil(lim.run_timeout_s) if lim.run_timeout_s else self.default_timeout_s
        kwargs: dict[str, Any] = {
            "env": {**self.env, "SANDBOXNB_TOKEN": token, "PYTHONUNBUFFERED": "1"},
            "tags": self.tags_for(acquisition),
            "timeout": timeout,
        }
        if self.encrypted:
            kwargs["encrypted_ports"] = [_PORT]
        else:
            kwargs["unencrypted_ports"] = [_PORT]
        if lim.idle_timeout_s is not None:
            kwargs["idle_timeout"] = max(1, math.ceil(lim.idle_timeout_s))
        if res.cpu is not None:
            kwargs["cpu"] = float(res.cpu)
        if res.memory_mb is not None:
            kwargs["memory"] = (res.memory_mb, res.memory_mb)
        if res.gpu is not None:
            kwargs["gpu"] = str(res.gpu)
        if self.region:
            kwargs["region"] = self.region
        if self.cloud:
            kwargs["cloud"] = self.cloud
        return kwargs

    # ----------------------------------------------------------------- SDK plumbing
    async def _ensure_app(self) -> tuple[Any, Any]:
        """The provider's own SDK client and App (created once, reused by every sandbox)."""
        if self._setup_lock is None:
            self._setup_lock = asyncio.Lock()
        async with self._setup_lock:
            if self._app is None:
                import modal

                token_id, token_secret = self._token or _credentials()[:2]
                if not (token_id and token_secret):
                    raise ProviderError(f"modal: {self.availability().reason}")
                try:
                    client = await modal.Client.from_credentials.aio(token_id, token_secret)
                    self._app = await modal.App.lookup.aio(
                        self.app_name, create_if_missing=True, client=client,
                        environment_name=self.environment_name,
                    )
                except modal.exception.Error as err:
                    raise ProviderError(
                        f"modal: cannot open app {self.app_name!r} ({type(err).__name__}: {err})"
                    ) from err
                self._client = client
        return self._client, self._app

    async def _image_handle(self, spec: Any, app: Any) -> Any:
        """A hydrated ``modal.Image`` for ``spec``; built/looked up once per provider."""
        import modal

        key = spec if isinstance(spec, str) else f"object:{id(spec)}"
        lock = self._image_locks.setdefault(key, asyncio.Lock())
        async with lock:
            if key in self._images:
                return self._images[key]
            if isinstance(spec, str):
                if spec.startswith(PUBLISHED_PREFIX):
                    image = modal.Image.from_name(spec[len(PUBLISHED_PREFIX):])
                elif spec.startswith("im-"):
                    image = modal.Image.from_id(spec)
                else:
                    image = modal.Image.from_registry(spec)
            else:
                image = spec
            try:
                await image.build.aio(app)
            except modal.exception.Error as err:
                raise ProviderError(
                    f"modal: image {_image_label(spec)!r} could not be resolved "
                    f"({type(err).__name__}: {err})"
                ) from err
            self._images[key] = image
            return image

    async def _sweep(self, client: Any, app: Any, acquisition: str) -> list[str]:
        """Terminate sandboxes of an interrupted create, found by their acquisition tag."""
        import modal

        found: list[str] = []
        for attempt in range(3):  # a create still in flight may land a moment later
            async for sb in modal.Sandbox.list.aio(
                app_id=app.app_id, tags={"acquisition": acquisition}, client=client
            ):
                with contextlib.suppress(modal.exception.Error):
                    await sb.terminate.aio()
                found.append(sb.object_id)
            if found or attempt == 2:
                return found
            await asyncio.sleep(0.2)
        return found

    async def _wait_ready(
        self, sb: Any, host: str, port: int, token: str, encrypted: bool
    ) -> float:
        """Retry connect + auth handshake until the server answers; return the handshake time."""
        from sandboxnb import protocol as P

        ctx = _tls_context() if encrypted else None
        delay, next_poll = 0.01, time.monotonic() + 0.5
        last: Exception | None = None
        while True:
            writer = None
            try:
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=ctx, server_hostname=host if ctx else None
                )
                started = time.perf_counter()
                writer.write(P.encode(P.request(1, "auth", {
                    "token": token, "protocol": P.PROTOCOL_VERSION,
                })))
                await writer.drain()
                line = await reader.readline()
                if line:
                    reply = P.decode(line)
                    if "error" in reply:
                        raise ProviderError(
                            f"modal: sandbox server rejected the handshake: {reply['error']}"
                        )
                    return time.perf_counter() - started
                last = ConnectionError("tunnel closed before the server answered")
            except ssl.SSLCertVerificationError as err:
                raise ProviderError(
                    f"modal: TLS verification of tunnel {host}:{port} failed ({err}); set "
                    "SANDBOXNB_TLS_CA_FILE if the tunnel uses a private CA"
                ) from err
            except (OSError, ssl.SSLError, asyncio.IncompleteReadError) as err:
                last = err
            finally:
                if writer is not None:
                    writer.close()
                    with contextlib.suppress(Exception):
                        await writer.wait_closed()
            if time.monotonic() >= next_poll:  # has the sandbox died (e.g. no python3)?
                next_poll = time.monotonic() + 0.5
                code = await sb.poll.aio()
                if code is not None:
                    raise ProviderError(
                        f"modal: sandbox {sb.object_id} exited with code {code} before its server "
                        f"was ready (the image needs python3 >= 3.9); last error: {last}"
                    )
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.05)

    # ----------------------------------------------------------------- provider API
    def sandbox(self, config: RuntimeConfig) -> contextlib.AbstractAsyncContextManager[Endpoint]:
        """Create a Modal Sandbox running the server; yield its endpoint; terminate it always."""
        config = self.check(config)
        return self._sandbox(config)

    @contextlib.asynccontextmanager
    async def _sandbox(self, config: RuntimeConfig) -> AsyncIterator[Endpoint]:
        import modal

        acquisition = secrets.token_hex(8)
        token = secrets.token_urlsafe(32)
        spec = config.image or self.image or DEFAULT_IMAGE
        startup = config.limits.startup_timeout_s or _DEFAULT_STARTUP_S
        client = app = sb = None
        create_started = False
        phases: dict[str, float] = {}
        t0 = time.perf_counter()
        try:
            try:
                async with asyncio.timeout(startup):
                    client, app = await self._ensure_app()
                    image = await self._image_handle(spec, app)
                    phases["setup_s"] = time.perf_counter() - t0
                    kwargs = self._create_kwargs(config, acquisition, token)
                    argv = self._entrypoint(config, f"modal-{acquisition}")
                    t1 = time.perf_counter()
                    create_started = True
                    try:
                        sb = await modal.Sandbox.create.aio(
                            *argv, app=app, image=image, client=client, **kwargs
                        )
                    except modal.exception.Error as err:
                        raise ProviderError(
                            f"modal: Sandbox.create failed ({type(err).__name__}: {err})"
                        ) from err
                    t2 = time.perf_counter()
                    tunnel = (await sb.tunnels.aio())[_PORT]
                    t3 = time.perf_counter()
                    if self.encrypted:
                        host, port, scheme = tunnel.host, tunnel.port, "tls"
                    else:
                        host, port = tunnel.tcp_socket
                        scheme = "tcp"
                    handshake_s = await self._wait_ready(sb, host, port, token, self.encrypted)
                    t4 = time.perf_counter()
            except TimeoutError as err:
                where = "creating the sandbox" if sb is None else "waiting for its server"
                raise ProviderError(
                    f"modal: sandbox not ready within startup_timeout_s={startup:g} ({where}; "
                    f"image {_image_label(spec)!r})"
                ) from err
            phases.update(create_s=t2 - t1, tunnels_s=t3 - t2, ready_s=t4 - t3,
                          handshake_s=handshake_s, acquire_s=t4 - t0)
            yield Endpoint(
                url=f"{scheme}://{host}:{port}",
                token=token,
                sandbox_id=sb.object_id,
                provider=self.name,
                config=config.merge({"image": _image_label(spec)}),
                meta={
                    "app_id": app.app_id,
                    "acquisition": acquisition,
                    "encrypted": self.encrypted,
                    "tunnel": {"host": host, "port": port},
                    "phases": {k: round(v, 4) for k, v in phases.items()},
                },
            )
        finally:
            await self._release(client, app, sb, acquisition if create_started else None)

    async def _release(self, client: Any, app: Any, sb: Any, acquisition: str | None) -> None:
        """Terminate the sandbox (or sweep an interrupted create), even if cancelled again."""
        import modal

        async def release() -> None:
            if sb is not None:
                with contextlib.suppress(modal.exception.NotFoundError):
                    await sb.terminate.aio()
            elif acquisition is not None and app is not None:
                await self._sweep(client, app, acquisition)

        task = asyncio.ensure_future(release())
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(task), 30)
            raise

    async def live_sandboxes(self) -> list[str]:
        """Ids of this owner's running sandboxes (any session) in the provider's app."""
        import modal

        client, app = await self._ensure_app()
        return [
            sb.object_id
            async for sb in modal.Sandbox.list.aio(
                app_id=app.app_id, tags={TAG: "1", "owner": self.owner}, client=client
            )
        ]

    async def reap(self, *, session_only: bool = False) -> list[str]:
        """Terminate this owner's running sandboxes (or only this session's); return their ids."""
        import modal

        client, app = await self._ensure_app()
        tags = {TAG: "1", "owner": self.owner}
        if session_only:
            tags["session"] = self.session_id
        found = [
            sb async for sb in modal.Sandbox.list.aio(app_id=app.app_id, tags=tags, client=client)
        ]
        await asyncio.gather(*(sb.terminate.aio() for sb in found), return_exceptions=True)
        return [sb.object_id for sb in found]

    async def aclose(self) -> None:
        """Close the provider's SDK client."""
        client, self._client, self._app = self._client, None, None
        self._images.clear()
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close.aio()

    @classmethod
    def availability(cls) -> Availability:
        """Available when the SDK imports and credentials are configured the SDK's way."""
        try:
            import modal  # noqa: F401
        except ImportError:
            return Availability(False, "the modal SDK is missing: pip install 'sandboxnb[modal]'")
        token_id, token_secret, source = _credentials()
        if not (token_id and token_secret):
            return Availability(
                False,
                "no Modal credentials: set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET, or run "
                "`modal token new` (profile in ~/.modal.toml, or MODAL_CONFIG_PATH/MODAL_PROFILE)",
            )
        server = os.environ.get("MODAL_SERVER_URL")
        where = f" at {server}" if server else ""
        return Availability(True, f"credentials from {source}{where}")


def _is_modal_image(value: Any) -> bool:
    try:
        import modal
    except ImportError:
        return False
    return isinstance(value, modal.Image)


def _image_label(spec: Any) -> str:
    if isinstance(spec, str):
        return spec
    return json.dumps(repr(spec))[1:-1]
