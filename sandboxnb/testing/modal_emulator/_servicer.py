"""The gRPC face of the emulator: the ``modal.client.ModalClient`` RPCs the SDK calls for a
sandbox's life. Every other RPC answers UNIMPLEMENTED, naming itself, and is recorded."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import secrets
import string
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from google.protobuf import empty_pb2
from grpclib import GRPCError, Status
from grpclib.server import Stream
from modal_proto import api_pb2
from modal_proto.api_grpc import ModalClientBase

from sandboxnb.testing.faults import FaultRule
from sandboxnb.testing.modal_emulator._sandbox import CreateRecord, EmulatedSandbox

if TYPE_CHECKING:
    from sandboxnb.testing.modal_emulator._emulator import ModalEmulator

__all__ = ["ModalServicer"]

log = logging.getLogger("sandboxnb.modal_emulator")

_ALNUM = string.ascii_letters + string.digits
IMAGE_BUILDER_VERSION = "2026.10"
_V2_TASK_MARKER = "-sbx2"  # V2 task ids carry a kind marker; ours only needs to be unique


def _rand(n: int = 22) -> str:
    return "".join(secrets.choice(_ALNUM) for _ in range(n))


def _jwt(payload: dict[str, Any]) -> str:
    def enc(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{enc({'alg': 'none', 'typ': 'JWT'})}.{enc(payload)}."


class _Image:
    def __init__(self, image_id: str, ref: str | None, built: bool) -> None:
        self.id, self.ref = image_id, ref
        self.built = asyncio.Event()
        if built:
            self.built.set()


class ModalServicer(ModalClientBase):
    """State of one emulated control plane (apps, images, secrets, sandboxes)."""

    def __init__(self, emulator: ModalEmulator) -> None:
        self.emu = emulator
        self.calls: Counter[str] = Counter()
        self.seconds: Counter[str] = Counter()  # server-side handling time per RPC name
        self.unimplemented: list[str] = []
        self.apps: dict[tuple[str, str], str] = {}
        self.images: dict[str, _Image] = {}
        self._image_keys: dict[bytes, str] = {}
        self.image_requests: list[tuple[str, str | None]] = []  # (image id, ref) per GetOrCreate
        self.published: dict[str, str] = {}  # name:tag -> image id
        self.secret_env: dict[str, dict[str, str]] = {}
        self.sandboxes: dict[str, EmulatedSandbox] = {}

    # -- plumbing ----------------------------------------------------------------------------

    def _check_auth(self, stream: Stream, name: str) -> None:
        self.calls[name] += 1
        md = stream.metadata or {}
        token_id, secret = md.get("x-modal-token-id"), md.get("x-modal-token-secret")
        if name == "ClientHello" and not token_id:
            return
        if (token_id, secret) != (self.emu.token_id, self.emu.token_secret):
            raise GRPCError(Status.UNAUTHENTICATED, "emulator: invalid Modal token id/secret")

    async def _unary(self, stream: Stream, name: str, fn: Callable[[Any], Any]) -> None:
        request = await stream.recv_message()
        started = time.perf_counter()
        self._check_auth(stream, name)
        fault = self.emu.faults.take(name)
        if fault is not None and not fault.reset:
            raise _fault_error(name, fault)
        try:
            result = fn(request)
            if asyncio.iscoroutine(result):
                result = await result
        except GRPCError:
            raise
        except Exception:
            log.exception("modal emulator: %s failed", name)
            raise
        finally:
            self.seconds[name] += time.perf_counter() - started
        if fault is not None:  # carried out, but the answer never arrives: RST_STREAM
            log.info("modal emulator: injected fault: %s done, then reset", name)
            await stream.cancel()
            return
        await stream.send_message(result)

    # -- client, environment, apps -----------------------------------------------------------

    async def ClientHello(self, stream: Stream) -> None:
        await self._unary(stream, "ClientHello", lambda _: api_pb2.ClientHelloResponse())

    async def AuthTokenGet(self, stream: Stream) -> None:
        now = int(time.time())
        token = _jwt({"iat": now, "exp": now + 3600, "sub": self.emu.token_id})
        reply = api_pb2.AuthTokenGetResponse(token=token)
        await self._unary(stream, "AuthTokenGet", lambda _: reply)

    async def EnvironmentGetOrCreate(self, stream: Stream) -> None:
        def handle(req: api_pb2.EnvironmentGetOrCreateRequest) -> Any:
            name = req.deployment_name or "main"
            return api_pb2.EnvironmentGetOrCreateResponse(
                environment_id="en-" + hashlib.sha1(name.encode()).hexdigest()[:22],
                metadata=api_pb2.EnvironmentMetadata(
                    name=name,
                    settings=api_pb2.EnvironmentSettings(
                        image_builder_version=IMAGE_BUILDER_VERSION, webhook_suffix="emulator"
                    ),
                ),
            )

        await self._unary(stream, "EnvironmentGetOrCreate", handle)

    async def AppGetOrCreate(self, stream: Stream) -> None:
        def handle(req: api_pb2.AppGetOrCreateRequest) -> Any:
            key = (req.environment_name or "main", req.app_name)
            if key not in self.apps:
                if req.object_creation_type != api_pb2.OBJECT_CREATION_TYPE_CREATE_IF_MISSING:
                    raise GRPCError(Status.NOT_FOUND, f"App '{req.app_name}' not found")
                self.apps[key] = "ap-" + _rand()
            return api_pb2.AppGetOrCreateResponse(app_id=self.apps[key])

        await self._unary(stream, "AppGetOrCreate", handle)

    async def SecretGetOrCreate(self, stream: Stream) -> None:
        def handle(req: api_pb2.SecretGetOrCreateRequest) -> Any:
            if req.object_creation_type not in (
                api_pb2.OBJECT_CREATION_TYPE_EPHEMERAL,
                api_pb2.OBJECT_CREATION_TYPE_ANONYMOUS_OWNED_BY_APP,
            ):
                raise GRPCError(Status.NOT_FOUND, f"Secret '{req.deployment_name}' not found")
            secret_id = "st-" + _rand()
            self.secret_env[secret_id] = dict(req.env_dict)
            return api_pb2.SecretGetOrCreateResponse(secret_id=secret_id)

        await self._unary(stream, "SecretGetOrCreate", handle)

    # -- images ------------------------------------------------------------------------------

    def publish_image(self, name: str, ref: str) -> str:
        image_id = "im-" + _rand()
        self.images[image_id] = _Image(image_id, ref, built=True)
        self.published[name if ":" in name else f"{name}:latest"] = image_id
        return image_id

    def _image_ref(self, image: api_pb2.Image) -> str | None:
        for base in image.base_images:
            if base.image_id in self.images and self.images[base.image_id].ref:
                return self.images[base.image_id].ref
        for cmd in image.dockerfile_commands:
            if cmd.upper().startswith("FROM "):
                ref = cmd.split(None, 1)[1].strip()
                if ref.lower() != "base":
                    return ref
        return None

    async def ImageGetOrCreate(self, stream: Stream) -> None:
        def handle(req: api_pb2.ImageGetOrCreateRequest) -> Any:
            key = req.image.SerializeToString(deterministic=True) + req.builder_version.encode()
            ref = self._image_ref(req.image)
            image_id = self._image_keys.get(key)
            if image_id is None:
                image_id = "im-" + _rand()
                self._image_keys[key] = image_id
                img = _Image(image_id, ref, built=False)
                self.images[image_id] = img
                asyncio.get_running_loop().call_later(self.emu.image_build_s, img.built.set)
            self.image_requests.append((image_id, ref))
            img = self.images[image_id]
            result = api_pb2.GenericResult()
            if img.built.is_set():
                result = api_pb2.GenericResult(status=api_pb2.GenericResult.GENERIC_STATUS_SUCCESS)
            return api_pb2.ImageGetOrCreateResponse(image_id=image_id, result=result)

        await self._unary(stream, "ImageGetOrCreate", handle)

    async def ImageJoinStreaming(self, stream: Stream) -> None:
        req = await stream.recv_message()
        self._check_auth(stream, "ImageJoinStreaming")
        img = self.images.get(req.image_id)
        if img is None:
            raise GRPCError(Status.NOT_FOUND, f"Image {req.image_id} not found")
        try:
            await asyncio.wait_for(img.built.wait(), req.timeout or 55)
        except TimeoutError:
            await stream.send_message(api_pb2.ImageJoinStreamingResponse(eof=True))
            return
        await stream.send_message(
            api_pb2.ImageJoinStreamingResponse(
                result=api_pb2.GenericResult(status=api_pb2.GenericResult.GENERIC_STATUS_SUCCESS),
                eof=True,
            )
        )

    async def ImageGetByTag(self, stream: Stream) -> None:
        def handle(req: api_pb2.ImageGetByTagRequest) -> Any:
            tag = req.tag.rsplit("/", 1)[-1]
            if tag not in self.published:
                raise GRPCError(Status.NOT_FOUND, f"Image '{req.tag}' not found")
            return api_pb2.ImageGetByTagResponse(image_id=self.published[tag])

        await self._unary(stream, "ImageGetByTag", handle)

    async def ImageFromId(self, stream: Stream) -> None:
        def handle(req: api_pb2.ImageFromIdRequest) -> Any:
            if req.image_id not in self.images:
                raise GRPCError(Status.NOT_FOUND, f"Image {req.image_id} not found")
            return api_pb2.ImageFromIdResponse(image_id=req.image_id)

        await self._unary(stream, "ImageFromId", handle)

    # -- sandboxes ---------------------------------------------------------------------------

    def _record(self, api: str, sandbox_id: str, app_id: str, d: api_pb2.Sandbox,
                tags: Any, env: dict[str, str]) -> CreateRecord:
        res = d.resources
        gpu = None
        if res.gpu_config.gpu_type:
            count = res.gpu_config.count or 1
            gpu = res.gpu_config.gpu_type + (f":{count}" if count > 1 else "")
        image = self.images.get(d.image_id)
        return CreateRecord(
            sandbox_id=sandbox_id, api=api, app_id=app_id,
            cpu=res.milli_cpu / 1000 if res.milli_cpu else None,
            cpu_max=res.milli_cpu_max / 1000 if res.milli_cpu_max else None,
            memory_mb=res.memory_mb or None, memory_mb_max=res.memory_mb_max or None,
            gpu=gpu, timeout=d.timeout_secs,
            idle_timeout=d.idle_timeout_secs if d.HasField("idle_timeout_secs") else None,
            tags={t.tag_name: t.tag_value for t in tags},
            image_id=d.image_id, image=image.ref if image else None,
            ports=[(p.port, not p.unencrypted) for p in d.open_ports.ports],
            entrypoint=list(d.entrypoint_args),
            workdir=d.workdir if d.HasField("workdir") else None,
            env_keys=sorted(env),
        )

    async def _create(self, api: str, sandbox_id: str, task_id: str, req: Any,
                      env: dict[str, str]) -> EmulatedSandbox:
        d: api_pb2.Sandbox = req.definition
        if d.image_id not in self.images:
            raise GRPCError(Status.NOT_FOUND, f"Image {d.image_id!r} not found")
        if not d.timeout_secs:
            raise GRPCError(Status.INVALID_ARGUMENT, "timeout_secs must be set")
        record = self._record(api, sandbox_id, req.app_id, d, req.tags, env)
        self.emu.creates.append(record)
        sb = EmulatedSandbox(
            record, task_id=task_id, env=env, root_dir=self.emu.sandbox_root / sandbox_id,
            tls=self.emu.tls_context, tunnel_host=self.emu.tunnel_host,
        )
        self.sandboxes[sandbox_id] = sb
        started = time.perf_counter()
        try:
            await sb.start()
            record.start_s = time.perf_counter() - started
        except BaseException as err:
            await sb.stop("failed", api_pb2.GenericResult.GENERIC_STATUS_FAILURE, repr(err))
            raise
        return sb

    async def _create_guarded(self, *args: Any) -> EmulatedSandbox:
        # Like a real control plane, a create that arrived is carried out even if the caller
        # goes away mid-RPC; the delay after it models a slow answer.
        sb = await asyncio.shield(self._create(*args))
        if self.emu.create_delay_s:
            await asyncio.sleep(self.emu.create_delay_s)
        return sb

    async def SandboxCreate(self, stream: Stream) -> None:
        async def handle(req: api_pb2.SandboxCreateRequest) -> Any:
            env: dict[str, str] = {}
            for sid in req.definition.secret_ids:
                env.update(self.secret_env.get(sid, {}))
            sandbox_id = "sb-" + _rand()
            await self._create_guarded("v1", sandbox_id, "ta-" + _rand(), req, env)
            return api_pb2.SandboxCreateResponse(sandbox_id=sandbox_id)

        await self._unary(stream, "SandboxCreate", handle)

    async def SandboxCreateV2(self, stream: Stream) -> None:
        async def handle(req: api_pb2.SandboxCreateV2Request) -> Any:
            env: dict[str, str] = {}
            for source in req.secret_sources:
                if source.HasField("env"):
                    env.update(source.env.contents)
                else:
                    env.update(self.secret_env.get(source.secret_id, {}))
            sandbox_id = "sb-v2" + _rand(24)  # not the V1 shape: the SDK routes it to V2
            sb = await self._create_guarded(
                "v2", sandbox_id, "ta-" + _rand() + _V2_TASK_MARKER, req, env
            )
            return api_pb2.SandboxCreateV2Response(
                sandbox_id=sandbox_id, task_id=sb.task_id, tunnels=sb.tunnel_protos(),
                metadata=api_pb2.SandboxHandleMetadata(app_id=req.app_id),
            )

        await self._unary(stream, "SandboxCreateV2", handle)

    def _get(self, sandbox_id: str) -> EmulatedSandbox:
        sb = self.sandboxes.get(sandbox_id)
        if sb is None:
            raise GRPCError(Status.NOT_FOUND, f"Sandbox {sandbox_id} not found")
        return sb

    def _task_id(self, req: api_pb2.SandboxGetTaskIdRequest) -> Any:
        sb = self._get(req.sandbox_id)
        if sb.finished.is_set():
            return api_pb2.SandboxGetTaskIdResponse(task_result=sb.result)
        return api_pb2.SandboxGetTaskIdResponse(task_id=sb.task_id)

    async def SandboxGetTaskId(self, stream: Stream) -> None:
        await self._unary(stream, "SandboxGetTaskId", self._task_id)

    async def SandboxGetTaskIdV2(self, stream: Stream) -> None:
        await self._unary(stream, "SandboxGetTaskIdV2", self._task_id)

    def _tunnels(self, req: api_pb2.SandboxGetTunnelsRequest) -> Any:
        sb = self._get(req.sandbox_id)
        if sb.finished.is_set():
            return api_pb2.SandboxGetTunnelsResponse(result=sb.result)
        return api_pb2.SandboxGetTunnelsResponse(
            result=api_pb2.GenericResult(status=api_pb2.GenericResult.GENERIC_STATUS_SUCCESS),
            tunnels=sb.tunnel_protos(),
        )

    async def SandboxGetTunnels(self, stream: Stream) -> None:
        await self._unary(stream, "SandboxGetTunnels", self._tunnels)

    async def SandboxGetTunnelsV2(self, stream: Stream) -> None:
        await self._unary(stream, "SandboxGetTunnelsV2", self._tunnels)

    async def _wait(self, req: api_pb2.SandboxWaitRequest) -> Any:
        sb = self._get(req.sandbox_id)
        if req.timeout > 0 and not sb.finished.is_set():
            try:
                await asyncio.wait_for(sb.finished.wait(), min(req.timeout, 55))
            except TimeoutError:
                pass
        result = sb.result if sb.finished.is_set() else api_pb2.GenericResult()
        return api_pb2.SandboxWaitResponse(result=result)

    async def SandboxWait(self, stream: Stream) -> None:
        await self._unary(stream, "SandboxWait", self._wait)

    async def SandboxWaitV2(self, stream: Stream) -> None:
        await self._unary(stream, "SandboxWaitV2", self._wait)

    async def _terminate(self, req: api_pb2.SandboxTerminateRequest) -> Any:
        sb = self._get(req.sandbox_id)
        existing = sb.result if sb.finished.is_set() else None
        if existing is None:
            await sb.stop("terminated", api_pb2.GenericResult.GENERIC_STATUS_TERMINATED)
        return api_pb2.SandboxTerminateResponse(existing_result=existing)

    async def SandboxTerminate(self, stream: Stream) -> None:
        await self._unary(stream, "SandboxTerminate", self._terminate)

    async def SandboxTerminateV2(self, stream: Stream) -> None:
        await self._unary(stream, "SandboxTerminateV2", self._terminate)

    def _list(self, req: api_pb2.SandboxListRequest) -> Any:
        wanted = {t.tag_name: t.tag_value for t in req.tags}
        found = []
        for sb in self.sandboxes.values():
            rec = sb.record
            if req.app_id and rec.app_id != req.app_id:
                continue
            if not req.include_finished and sb.finished.is_set():
                continue
            if req.before_timestamp and rec.created_at >= req.before_timestamp:
                continue
            if any(rec.tags.get(k) != v for k, v in wanted.items()):
                continue
            found.append(sb)
        found.sort(key=lambda s: s.record.created_at, reverse=True)
        return api_pb2.SandboxListResponse(
            sandboxes=[
                api_pb2.SandboxInfo(
                    id=sb.id, created_at=sb.record.created_at, app_id=sb.record.app_id,
                    tags=[api_pb2.SandboxTag(tag_name=k, tag_value=v)
                          for k, v in sb.record.tags.items()],
                    task_info=api_pb2.TaskInfo(id=sb.task_id, result=sb.result),
                    metadata=api_pb2.SandboxHandleMetadata(app_id=sb.record.app_id),
                    timeout_secs=sb.record.timeout,
                )
                for sb in found[:100]
            ]
        )

    async def SandboxList(self, stream: Stream) -> None:
        await self._unary(stream, "SandboxList", self._list)

    async def SandboxListV2(self, stream: Stream) -> None:
        await self._unary(stream, "SandboxListV2", self._list)

    def _tags_get(self, req: api_pb2.SandboxTagsGetRequest) -> Any:
        rec = self._get(req.sandbox_id).record
        return api_pb2.SandboxTagsGetResponse(
            tags=[api_pb2.SandboxTag(tag_name=k, tag_value=v) for k, v in rec.tags.items()]
        )

    async def SandboxTagsGet(self, stream: Stream) -> None:
        await self._unary(stream, "SandboxTagsGet", self._tags_get)

    async def SandboxTagsGetV2(self, stream: Stream) -> None:
        await self._unary(stream, "SandboxTagsGetV2", self._tags_get)

    async def AppClientDisconnect(self, stream: Stream) -> None:
        await self._unary(stream, "AppClientDisconnect", lambda _: empty_pb2.Empty())


def _fault_error(name: str, fault: FaultRule) -> GRPCError:
    """The error of an injected fault; a Retry-After becomes Modal's ``RPCRetryPolicy``."""
    try:
        status = Status[fault.error.upper()]
    except KeyError:
        raise GRPCError(Status.INTERNAL, f"emulator: fault {fault.error!r} on {name} is not a "
                        f"gRPC status; accepted: reset, {', '.join(s.name for s in Status)}"
                        ) from None
    details = None
    if fault.retry_after is not None:
        details = [api_pb2.RPCRetryPolicy(retry_after_secs=fault.retry_after)]
    log.info("modal emulator: injected fault: %s -> %s", name, status.name)
    return GRPCError(status, fault.message or f"emulator: injected {status.name} on {name}",
                     details)


def _unimplemented(name: str) -> Callable[..., Any]:
    async def handler(self: ModalServicer, stream: Stream) -> None:
        self.calls[name] += 1
        self.unimplemented.append(name)
        log.error("modal emulator: UNIMPLEMENTED RPC %s", name)
        raise GRPCError(Status.UNIMPLEMENTED, f"modal emulator does not implement {name}")

    handler.__name__ = name
    return handler


for _name in list(ModalClientBase.__abstractmethods__):
    if _name not in ModalServicer.__dict__:
        setattr(ModalServicer, _name, _unimplemented(_name))
ModalServicer.__abstractmethods__ = frozenset()
