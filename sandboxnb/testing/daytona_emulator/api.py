"""REST control plane routes of the Daytona emulator (``/sandbox``, ``/snapshots``, SSH access)."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from typing import TYPE_CHECKING, Any

from aiohttp import web

from sandboxnb.testing.daytona_emulator.state import (
    CREATE_SANDBOX_FIELDS,
    CREATE_SNAPSHOT_FIELDS,
    DEFAULT_SNAPSHOT,
    GPU_TYPES,
    EmulatedSandbox,
    EmulatedSnapshot,
    SshToken,
    now_iso,
)

if TYPE_CHECKING:
    from sandboxnb.testing.daytona_emulator.emulator import DaytonaEmulator


def api_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """A NestJS-style error body, as the real API sends."""
    reason = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
              409: "Conflict", 429: "Too Many Requests", 500: "Internal Server Error",
              501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable",
              504: "Gateway Timeout"}.get(status, "Error")
    return web.json_response({"statusCode": status, "message": message, "error": reason},
                             status=status, headers=headers)


class BadRequest(Exception):
    """Raised by validators; becomes a 400 naming the field."""


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadRequest(f"request body is not JSON: {err}") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


def _int_field(body: dict, name: str, lo: int, hi: int | None, default: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (
            hi is not None and value > hi):
        bound = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise BadRequest(f"{name} = {value!r}: expected an integer in {bound}")
    return value


def _str_map(body: dict, name: str) -> dict[str, str]:
    value = body.get(name) or {}
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise BadRequest(f"{name} = {value!r}: expected an object of string values")
    return dict(value)


def _gpu_types(body: dict) -> list[str] | None:
    value = body.get("gpuType")
    if value is None:
        return None
    if not isinstance(value, list) or not all(v in GPU_TYPES for v in value):
        raise BadRequest(f"gpuType = {value!r}: expected a list of {', '.join(GPU_TYPES)}")
    return list(value)


class ControlPlane:
    """Handlers for the control-plane routes, bound to one emulator."""

    def __init__(self, emu: DaytonaEmulator) -> None:
        self.emu = emu

    def routes(self) -> list[web.RouteDef]:
        """Routes in match order (fixed paths before ``{id}`` paths)."""
        return [
            web.get("/sandbox/ssh-access/validate", self.validate_ssh),
            web.post("/sandbox", self.create_sandbox),
            web.get("/sandbox", self.list_sandboxes),
            web.get("/sandbox/{id}", self.get_sandbox),
            web.delete("/sandbox/{id}", self.delete_sandbox),
            web.post("/sandbox/{id}/stop", self.stop_sandbox),
            web.post("/sandbox/{id}/last-activity", self.last_activity),
            web.post("/sandbox/{id}/autostop/{interval}", self.set_autostop),
            web.post("/sandbox/{id}/ssh-access", self.create_ssh),
            web.delete("/sandbox/{id}/ssh-access", self.revoke_ssh),
            web.get("/sandbox/{id}/toolbox-proxy-url", self.toolbox_url),
            web.post("/snapshots", self.create_snapshot),
            web.get("/snapshots/{id}", self.get_snapshot),
            web.delete("/snapshots/{id}", self.delete_snapshot),
        ]

    # -- sandboxes --------------------------------------------------------------------------

    def _sandbox(self, request: web.Request) -> EmulatedSandbox:
        key = request.match_info["id"]
        sb = self.emu.find_sandbox(key)
        if sb is None:
            raise web.HTTPNotFound(
                text=json.dumps({"statusCode": 404, "message": f"Sandbox with ID or name {key} "
                                 "not found", "error": "Not Found"}),
                content_type="application/json")
        sb.touch()
        return sb

    def _validate_create(self, body: dict) -> dict[str, Any]:
        unknown = sorted(set(body) - CREATE_SANDBOX_FIELDS)
        if unknown:
            raise BadRequest(f"unknown field(s) {', '.join(unknown)}; accepted: "
                             f"{', '.join(sorted(CREATE_SANDBOX_FIELDS))}")
        emu = self.emu
        out: dict[str, Any] = {
            "labels": _str_map(body, "labels"), "env": _str_map(body, "env"),
            "auto_stop": _int_field(body, "autoStopInterval", 0, None, 15),
            "auto_archive": _int_field(body, "autoArchiveInterval", 0, None, 10080),
            "auto_delete": _int_field(body, "autoDeleteInterval", -1, None, -1),
            "gpu_type": _gpu_types(body),
        }
        target = body.get("target") or emu.target
        if target not in emu.targets:
            raise BadRequest(f"target = {target!r}: expected one of {', '.join(emu.targets)}")
        out["target"] = target
        resources = {k: body.get(k) for k in ("cpu", "memory", "disk", "gpu")
                     if body.get(k) is not None}
        snap_name = body.get("snapshot")
        if snap_name is not None and body.get("buildInfo") is not None:
            raise BadRequest("snapshot and buildInfo are mutually exclusive")
        if body.get("buildInfo") is not None:
            raise BadRequest("buildInfo (declarative image builds) is not emulated; "
                             "create a snapshot with POST /snapshots")
        snap = emu.find_snapshot(snap_name or DEFAULT_SNAPSHOT)
        if snap is None:
            raise BadRequest(f"snapshot = {snap_name!r}: no such snapshot")
        snap.advance()
        if snap.state != "active":
            raise BadRequest(f"snapshot = {snap.name!r} is {snap.state}, not active")
        if resources or out["gpu_type"]:
            raise BadRequest(f"cannot specify sandbox resources {sorted(resources)} when using "
                             f"a snapshot (snapshot {snap.name!r} fixes them)")
        out["snapshot"] = snap
        return out

    async def create_sandbox(self, request: web.Request) -> web.Response:
        emu = self.emu
        try:
            body = await _json_body(request)
            emu.created.append(body)
            spec = self._validate_create(body)
        except BadRequest as err:
            return api_error(400, str(err))
        snap: EmulatedSnapshot = spec["snapshot"]
        sid = str(uuid.uuid4())
        name = body.get("name") or sid
        if any(s.name == name for s in emu.sandboxes.values()):
            return api_error(409, f"sandbox with name {name} already exists")
        sb = EmulatedSandbox(
            id=sid, name=name, snapshot=snap.name, labels=spec["labels"], env=spec["env"],
            target=spec["target"], cpu=snap.cpu, memory=snap.memory, disk=snap.disk,
            gpu=snap.gpu, gpu_type=snap.gpu_type, auto_stop_interval=spec["auto_stop"],
            auto_archive_interval=spec["auto_archive"], auto_delete_interval=spec["auto_delete"],
            toolbox_proxy_url=f"{emu.api_url}/toolbox", request=body,
        )
        emu.sandboxes[sid] = sb  # listed (state "creating") while it starts, as in Daytona
        if emu.create_delay_s:
            await asyncio.sleep(emu.create_delay_s)
        if sb.state == "creating":
            await emu.start_sandbox(sb)
        return web.json_response(sb.dto())

    async def list_sandboxes(self, request: web.Request) -> web.Response:
        labels: dict[str, str] = {}
        if request.query.get("labels"):
            try:
                labels = json.loads(request.query["labels"])
            except json.JSONDecodeError:
                return api_error(400, f"labels = {request.query['labels']!r}: expected JSON")
        states = request.query.getall("states", [])
        items = [
            sb.dto() for sb in self.emu.sandboxes.values()
            if all(sb.labels.get(k) == v for k, v in labels.items())
            and (not states or sb.state in states)
        ]
        return web.json_response({"items": items, "nextCursor": None})

    async def get_sandbox(self, request: web.Request) -> web.Response:
        return web.json_response(self._sandbox(request).dto())

    async def delete_sandbox(self, request: web.Request) -> web.Response:
        sb = self._sandbox(request)
        await self.emu.destroy_sandbox(sb)
        return web.json_response(sb.dto())

    async def stop_sandbox(self, request: web.Request) -> web.Response:
        sb = self._sandbox(request)
        await self.emu.stop_sandbox(sb, reason="stopped by request")
        return web.json_response(sb.dto())

    async def last_activity(self, request: web.Request) -> web.Response:
        sb = self._sandbox(request)
        sb.activity_refreshes += 1
        return web.Response(status=201)

    async def set_autostop(self, request: web.Request) -> web.Response:
        sb = self._sandbox(request)
        try:
            sb.auto_stop_interval = int(request.match_info["interval"])
        except ValueError:
            return api_error(400, f"interval = {request.match_info['interval']!r}: not an int")
        return web.json_response(sb.dto())

    async def toolbox_url(self, request: web.Request) -> web.Response:
        sb = self._sandbox(request)
        return web.json_response({"url": sb.toolbox_proxy_url})

    # -- SSH access -------------------------------------------------------------------------

    async def create_ssh(self, request: web.Request) -> web.Response:
        sb = self._sandbox(request)
        try:
            minutes = int(request.query.get("expiresInMinutes", "60"))
        except ValueError:
            return api_error(400, "expiresInMinutes must be an integer")
        if minutes < 1:
            return api_error(400, f"expiresInMinutes = {minutes}: expected >= 1")
        token = SshToken(id=str(uuid.uuid4()), token=secrets.token_urlsafe(24), sandbox_id=sb.id,
                         expires_at=time.time() + minutes * 60)
        self.emu.ssh_tokens[token.token] = token
        expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(token.expires_at))
        return web.json_response({
            "id": token.id, "sandboxId": sb.id, "token": token.token, "expiresAt": expires,
            "createdAt": token.created_at, "updatedAt": token.created_at,
            "sshCommand": f"ssh -p {self.emu.ssh_port} {token.token}@127.0.0.1",
        })

    async def revoke_ssh(self, request: web.Request) -> web.Response:
        sb = self._sandbox(request)
        wanted = request.query.get("token")
        for tok in self.emu.ssh_tokens.values():
            if tok.sandbox_id == sb.id and (wanted is None or tok.token == wanted):
                tok.revoked = True
        return web.json_response(sb.dto())

    async def validate_ssh(self, request: web.Request) -> web.Response:
        tok = self.emu.ssh_tokens.get(request.query.get("token", ""))
        ok = tok is not None and tok.valid()
        return web.json_response({"valid": ok, "sandboxId": tok.sandbox_id if ok else ""})

    # -- snapshots --------------------------------------------------------------------------

    async def create_snapshot(self, request: web.Request) -> web.Response:
        emu = self.emu
        try:
            body = await _json_body(request)
            emu.snapshot_creates.append(body)
            unknown = sorted(set(body) - CREATE_SNAPSHOT_FIELDS)
            if unknown:
                raise BadRequest(f"unknown field(s) {', '.join(unknown)}")
            name = body.get("name")
            if not isinstance(name, str) or not name:
                raise BadRequest(f"name = {name!r}: expected a non-empty string")
            image = body.get("imageName")
            if body.get("buildInfo") is not None:
                raise BadRequest("buildInfo (declarative image builds) is not emulated; "
                                 "pass an image name")
            if not isinstance(image, str) or not image:
                raise BadRequest(f"imageName = {image!r}: expected an image name")
            cpu = _int_field(body, "cpu", 1, emu.max_cpu, 1)
            memory = _int_field(body, "memory", 1, emu.max_memory_gib, 1)
            disk = _int_field(body, "disk", 1, emu.max_disk_gib, 3)
            gpu = _int_field(body, "gpu", 0, emu.max_gpu, 0)
            gpu_type = _gpu_types(body)
        except BadRequest as err:
            return api_error(400, str(err))
        if emu.find_snapshot(name) is not None:
            return api_error(409, f"snapshot with name {name} already exists")
        snap = EmulatedSnapshot(
            id=str(uuid.uuid4()), name=name, image_name=image, cpu=cpu or 1,
            memory=memory or 1, disk=disk or 3, gpu=gpu or 0, gpu_type=gpu_type,
            ready_at=time.monotonic() + emu.snapshot_build_s,
            fails=any(image.startswith(p) for p in emu.failing_images),
        )
        emu.snapshots[snap.id] = snap
        return web.json_response(snap.dto())

    async def get_snapshot(self, request: web.Request) -> web.Response:
        key = request.match_info["id"]
        snap = self.emu.find_snapshot(key)
        if snap is None:
            return api_error(404, f"Snapshot with name {key} not found")
        snap.advance()
        return web.json_response(snap.dto())

    async def delete_snapshot(self, request: web.Request) -> web.Response:
        snap = self.emu.find_snapshot(request.match_info["id"])
        if snap is None:
            return api_error(404, f"Snapshot {request.match_info['id']} not found")
        del self.emu.snapshots[snap.id]
        return web.Response(status=200)


def default_snapshot() -> EmulatedSnapshot:
    """The general-purpose snapshot sandboxes use when none is named."""
    return EmulatedSnapshot(id=str(uuid.uuid4()), name=DEFAULT_SNAPSHOT,
                            image_name=DEFAULT_SNAPSHOT, cpu=1, memory=1, disk=3, gpu=0,
                            gpu_type=None, general=True,
                            state="active", created_at=now_iso())
