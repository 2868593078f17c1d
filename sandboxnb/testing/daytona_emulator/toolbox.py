"""Toolbox routes of the Daytona emulator: ``{toolboxProxyUrl}/{sandboxId}/process|files/...``.

Every call runs inside the sandbox's :class:`IsolatedSandbox` (commands, file I/O).
"""

from __future__ import annotations

import json
import os
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from aiohttp import MultipartWriter, web

from sandboxnb.testing.daytona_emulator.api import api_error
from sandboxnb.testing.daytona_emulator.state import EmulatedSandbox, SessionCommand
from sandboxnb.testing.isolation import IsolatedSandbox, SandboxHostError

if TYPE_CHECKING:
    from sandboxnb.testing.daytona_emulator.emulator import DaytonaEmulator

P = "/toolbox/{sid}"


def _disposition(name: str, path: str) -> str:
    # the SDK matches the raw path in filename=, so no percent-encoding (aiohttp's default)
    return f'form-data; name="{name}"; filename="{path.replace(chr(34), "%22")}"'


class Toolbox:
    """Handlers for the toolbox routes, bound to one emulator."""

    def __init__(self, emu: DaytonaEmulator) -> None:
        self.emu = emu

    def routes(self) -> list[web.RouteDef]:
        """Toolbox routes the SDK uses for processes and files."""
        return [
            web.post(P + "/process/execute", self.execute),
            web.post(P + "/process/session", self.create_session),
            web.get(P + "/process/session", self.list_sessions),
            web.get(P + "/process/session/{session}", self.get_session),
            web.delete(P + "/process/session/{session}", self.delete_session),
            web.post(P + "/process/session/{session}/exec", self.session_exec),
            web.get(P + "/process/session/{session}/command/{cmd}", self.get_command),
            web.get(P + "/process/session/{session}/command/{cmd}/logs", self.command_logs),
            web.post(P + "/files/bulk-upload", self.upload),
            web.post(P + "/files/bulk-download", self.download),
            web.get(P + "/files/download", self.download_one),
            web.post(P + "/files/folder", self.make_folder),
        ]

    def _target(self, request: web.Request) -> tuple[EmulatedSandbox, IsolatedSandbox]:
        sid = request.match_info["sid"]
        sb = self.emu.sandboxes.get(sid)
        if sb is None:
            raise web.HTTPNotFound(text=f"sandbox {sid} not found")
        if sb.state != "started" or sb.isolated is None or not sb.isolated.alive:
            raise web.HTTPBadRequest(text=json.dumps({
                "statusCode": 400, "error": "Bad Request",
                "message": f"sandbox {sid} is not started (state {sb.state})"}),
                content_type="application/json")
        sb.touch()
        return sb, sb.isolated

    @staticmethod
    def _path(isb: IsolatedSandbox, path: str) -> str:
        return path if path.startswith("/") else os.path.join(isb.workdir, path)

    async def _json(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            raise web.HTTPBadRequest(text="body is not JSON") from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text="body must be a JSON object")
        return body

    # -- processes --------------------------------------------------------------------------

    async def execute(self, request: web.Request) -> web.Response:
        _, isb = self._target(request)
        body = await self._json(request)
        command = body.get("command")
        if not isinstance(command, str) or not command:
            return api_error(400, f"command = {command!r}: expected a non-empty string")
        out = await isb.exec(command, cwd=body.get("cwd"), env=body.get("envs") or None,
                             timeout=body.get("timeout") or None)
        result = (out.stdout + out.stderr).decode(errors="replace")
        return web.json_response({"exitCode": out.exit_code, "result": result})

    def _session(self, request: web.Request) -> tuple[EmulatedSandbox, IsolatedSandbox, dict]:
        sb, isb = self._target(request)
        name = request.match_info["session"]
        if name not in sb.sessions:
            raise web.HTTPNotFound(text=f"session {name} not found")
        return sb, isb, sb.sessions[name]

    async def create_session(self, request: web.Request) -> web.Response:
        sb, _ = self._target(request)
        name = (await self._json(request)).get("sessionId")
        if not isinstance(name, str) or not name:
            return api_error(400, f"sessionId = {name!r}: expected a non-empty string")
        if name in sb.sessions:
            return api_error(409, f"session {name} already exists")
        sb.sessions[name] = {}
        return web.Response(status=201)

    async def _refresh(self, isb: IsolatedSandbox, cmd: SessionCommand) -> None:
        if cmd.pid is not None and cmd.exit_code is None:
            try:
                cmd.exit_code = await isb.process_exit_code(cmd.pid)
            except SandboxHostError:
                pass

    @staticmethod
    def _cmd_dto(cmd: SessionCommand) -> dict[str, Any]:
        return {"id": cmd.id, "command": cmd.command, "exitCode": cmd.exit_code}

    async def list_sessions(self, request: web.Request) -> web.Response:
        sb, isb = self._target(request)
        items = []
        for name, cmds in sb.sessions.items():
            for cmd in cmds.values():
                await self._refresh(isb, cmd)
            items.append({"sessionId": name, "commands": [self._cmd_dto(c) for c in cmds.values()]})
        return web.json_response(items)

    async def get_session(self, request: web.Request) -> web.Response:
        _, isb, cmds = self._session(request)
        for cmd in cmds.values():
            await self._refresh(isb, cmd)
        return web.json_response({"sessionId": request.match_info["session"],
                                  "commands": [self._cmd_dto(c) for c in cmds.values()]})

    async def delete_session(self, request: web.Request) -> web.Response:
        sb, isb, cmds = self._session(request)
        for cmd in cmds.values():
            if cmd.pid is not None and cmd.exit_code is None:
                try:
                    await isb.kill(cmd.pid)
                except SandboxHostError:
                    pass
        del sb.sessions[request.match_info["session"]]
        return web.Response(status=204)

    async def session_exec(self, request: web.Request) -> web.Response:
        _, isb, cmds = self._session(request)
        body = await self._json(request)
        command = body.get("command")
        if not isinstance(command, str) or not command:
            return api_error(400, f"command = {command!r}: expected a non-empty string")
        run_async = bool(body.get("runAsync") or body.get("async"))
        cmd = SessionCommand(id=str(uuid.uuid4()), command=command)
        cmds[cmd.id] = cmd
        if run_async:
            logdir = f"{isb.workdir}/.daytona/session-logs"
            cmd.stdout_path, cmd.stderr_path = f"{logdir}/{cmd.id}.out", f"{logdir}/{cmd.id}.err"
            cmd.pid = await isb.spawn_background(
                command, stdout_path=cmd.stdout_path, stderr_path=cmd.stderr_path)
            return web.json_response({"cmdId": cmd.id})
        out = await isb.exec(command)
        cmd.exit_code = out.exit_code
        cmd.stdout = out.stdout.decode(errors="replace")
        cmd.stderr = out.stderr.decode(errors="replace")
        return web.json_response({
            "cmdId": cmd.id, "exitCode": cmd.exit_code, "output": cmd.stdout + cmd.stderr,
            "stdout": cmd.stdout, "stderr": cmd.stderr,
        })

    async def get_command(self, request: web.Request) -> web.Response:
        _, isb, cmds = self._session(request)
        cmd = cmds.get(request.match_info["cmd"])
        if cmd is None:
            return api_error(404, f"command {request.match_info['cmd']} not found")
        await self._refresh(isb, cmd)
        return web.json_response(self._cmd_dto(cmd))

    async def command_logs(self, request: web.Request) -> web.Response:
        _, isb, cmds = self._session(request)
        cmd = cmds.get(request.match_info["cmd"])
        if cmd is None:
            return api_error(404, f"command {request.match_info['cmd']} not found")
        stdout, stderr = cmd.stdout, cmd.stderr
        if cmd.stdout_path:
            stdout = await self._read_text(isb, cmd.stdout_path)
            stderr = await self._read_text(isb, cmd.stderr_path or "")
        return web.json_response({"output": stdout + stderr, "stdout": stdout, "stderr": stderr})

    @staticmethod
    async def _read_text(isb: IsolatedSandbox, path: str) -> str:
        try:
            return (await isb.read_file(path)).decode(errors="replace")
        except (FileNotFoundError, SandboxHostError):
            return ""

    # -- files ------------------------------------------------------------------------------

    async def upload(self, request: web.Request) -> web.Response:
        _, isb = self._target(request)
        reader = await request.multipart()
        count = 0
        dests: dict[str, str] = {}
        async for part in reader:
            name = part.name or ""
            if name.endswith(".path"):
                dests[name[: -len(".path")]] = (await part.read()).decode()
            elif name.endswith(".file"):
                dest = dests.get(name[: -len(".file")]) or unquote(part.filename or "")
                if not dest:
                    return api_error(400, f"{name}: multipart file part has no destination")
                await isb.write_file(self._path(isb, dest), bytes(await part.read()))
                count += 1
            else:
                await part.read()
        if not count:
            return api_error(400, "no files[i].file parts in upload")
        return web.Response(status=200)

    async def download(self, request: web.Request) -> web.StreamResponse:
        _, isb = self._target(request)
        paths = (await self._json(request)).get("paths")
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            return api_error(400, f"paths = {paths!r}: expected a list of strings")
        writer = MultipartWriter("form-data")
        for path in paths:
            try:
                data = await isb.read_file(self._path(isb, path))
            except FileNotFoundError:
                part = writer.append_json({"message": f"file not found: {path}",
                                           "statusCode": 404, "code": "FILE_NOT_FOUND"})
                part.headers["Content-Disposition"] = _disposition("error", path)
                continue
            part = writer.append(data, {"Content-Type": "application/octet-stream"})
            part.headers["Content-Disposition"] = _disposition("file", path)
        resp = web.StreamResponse(headers={"Content-Type": writer.content_type})
        await resp.prepare(request)
        await writer.write(resp)
        await resp.write_eof()
        return resp

    async def download_one(self, request: web.Request) -> web.Response:
        _, isb = self._target(request)
        path = request.query.get("path", "")
        try:
            data = await isb.read_file(self._path(isb, path))
        except FileNotFoundError:
            return api_error(404, f"file not found: {path}")
        return web.Response(body=data, content_type="application/octet-stream")

    async def make_folder(self, request: web.Request) -> web.Response:
        _, isb = self._target(request)
        path = request.query.get("path", "")
        mode = request.query.get("mode", "755")
        out = await isb.exec(["mkdir", "-p", "-m", mode, self._path(isb, path)])
        if out.exit_code:
            return api_error(400, out.stderr.decode(errors="replace"))
        return web.Response(status=201)
