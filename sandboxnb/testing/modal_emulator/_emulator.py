"""The emulator process-side object: a grpclib server on its own thread and event loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import secrets
import shutil
import tempfile
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from grpclib.server import Server

from sandboxnb.testing.faults import FaultPlan
from sandboxnb.testing.modal_emulator._sandbox import CreateRecord
from sandboxnb.testing.modal_emulator._servicer import ModalServicer
from sandboxnb.testing.modal_emulator._tls import TunnelCertificates

__all__ = ["ModalEmulator"]

T = TypeVar("T")


class ModalEmulator:
    """An emulated Modal control plane that the unmodified ``modal`` SDK talks to.

    Use as a context manager: it starts the server on ``127.0.0.1`` (h2c, free port), points the
    SDK at it (``MODAL_SERVER_URL``, ``MODAL_TOKEN_ID``/``SECRET``, an empty ``MODAL_CONFIG_PATH``)
    and ``SANDBOXNB_TLS_CA_FILE`` at its tunnel CA; on exit it terminates every sandbox and
    restores the environment.

    ``create_delay_s`` delays each create's answer (after the sandbox exists, as when a real
    control plane is slow); ``image_build_s`` is how long a new image takes to "build".
    ``faults`` (:class:`~sandboxnb.testing.faults.FaultPlan`, by default from
    ``SANDBOXNB_EMULATOR_FAULTS``) makes chosen RPCs fail: a gRPC status (a Retry-After travels as
    Modal's ``RPCRetryPolicy`` detail) or ``reset`` (done, then the stream is reset).
    """

    def __init__(
        self,
        *,
        create_delay_s: float = 0.0,
        image_build_s: float = 0.05,
        tunnel_host: str = "localhost",
        set_env: bool = True,
        faults: FaultPlan | None = None,
    ) -> None:
        self.faults = faults if faults is not None else FaultPlan.from_env()
        self.create_delay_s = create_delay_s
        self.image_build_s = image_build_s
        self.tunnel_host = tunnel_host
        self.token_id = "ak-emu" + secrets.token_hex(8)
        self.token_secret = "as-emu" + secrets.token_hex(16)
        self.creates: list[CreateRecord] = []
        self._set_env = set_env
        self._saved_env: dict[str, str | None] = {}
        self._tmp: Path | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: Server | None = None
        self.servicer = ModalServicer(self)
        self.port = 0

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> ModalEmulator:
        """Start the server thread (idempotent is not supported: call once)."""
        self._tmp = Path(tempfile.mkdtemp(prefix="modal-emu-"))
        self.sandbox_root = self._tmp / "sandboxes"
        self.sandbox_root.mkdir()
        self.certs = TunnelCertificates(self._tmp / "tls", [self.tunnel_host, "127.0.0.1"])
        self.tls_context = self.certs.server_context()
        (self._tmp / "modal.toml").write_text("")
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run_loop, args=(ready,), name="modal-emulator", daemon=True
        )
        self._thread.start()
        ready.wait()
        self.port = self.call(self._serve())
        if self._set_env:
            self._apply_env(self.env())
        return self

    def _run_loop(self, ready: threading.Event) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(ready.set)
        self._loop.run_forever()

    async def _serve(self) -> int:
        from modal._utils.grpc_utils import custom_detail_codec

        # Modal's codec packs modal.* details (RPCRetryPolicy) the way its control plane does
        self._server = Server([self.servicer], status_details_codec=custom_detail_codec)
        await self._server.start("127.0.0.1", 0)
        sock = self._server._server.sockets[0]  # type: ignore[union-attr]
        return sock.getsockname()[1]

    def stop(self) -> None:
        """Terminate every sandbox, stop the server and restore the environment."""
        if self._loop is None:
            return
        try:
            self.call(self._shutdown(), timeout=30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            assert self._thread is not None
            self._thread.join(10)
            self._loop.close()
            self._loop = None
            for key, value in self._saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            self._saved_env.clear()
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)

    async def _shutdown(self) -> None:
        await self._shutdown_sandboxes()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await self._shutdown_sandboxes()  # any create that was still in flight
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    def __enter__(self) -> ModalEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = 30) -> T:
        """Run ``coro`` on the emulator's loop and wait for its result (from any thread)."""
        assert self._loop is not None
        fut: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return fut.result(timeout)

    # -- configuration -------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> str:
        """PEM file of the CA that signed the tunnel certificates."""
        return str(self.certs.ca_file)

    def env(self) -> dict[str, str]:
        """The environment that points the Modal SDK (and sandboxnb's TLS client) here."""
        assert self._tmp is not None
        return {
            "MODAL_SERVER_URL": self.url,
            "MODAL_TOKEN_ID": self.token_id,
            "MODAL_TOKEN_SECRET": self.token_secret,
            "MODAL_CONFIG_PATH": str(self._tmp / "modal.toml"),
            "SANDBOXNB_TLS_CA_FILE": self.ca_file,
        }

    def _apply_env(self, env: dict[str, str]) -> None:
        for key, value in env.items():
            self._saved_env.setdefault(key, os.environ.get(key))
            os.environ[key] = value

    # -- what tests look at ----------------------------------------------------------------

    def publish_image(self, name: str, ref: str = "python:3.11-slim") -> str:
        """Publish an image under ``name`` (for ``modal.Image.from_name``); returns its id."""
        return self.call(self._publish(name, ref))

    async def _publish(self, name: str, ref: str) -> str:
        return self.servicer.publish_image(name, ref)

    def live_sandboxes(self) -> list[str]:
        """Ids of emulated sandboxes still running."""
        return [sid for sid, sb in list(self.servicer.sandboxes.items()) if sb.alive]

    def live_processes(self) -> list[int]:
        """Host pids of sandbox process trees still alive (should be empty after teardown)."""
        return [
            sb.box.host_pid for sb in list(self.servicer.sandboxes.values())
            if sb.box is not None and sb.box.alive
        ]

    def terminate_all(self) -> None:
        """Terminate every live sandbox (as the Modal dashboard's "stop all" would)."""
        self.call(self._shutdown_sandboxes())

    async def _shutdown_sandboxes(self) -> None:
        from modal_proto import api_pb2

        await asyncio.gather(
            *(sb.stop("terminated", api_pb2.GenericResult.GENERIC_STATUS_TERMINATED)
              for sb in list(self.servicer.sandboxes.values())),
            return_exceptions=True,
        )

    @property
    def rpc_calls(self) -> dict[str, int]:
        """How often each RPC was called."""
        return dict(self.servicer.calls)

    @property
    def rpc_seconds(self) -> dict[str, float]:
        """Server-side handling time per RPC name, summed over calls."""
        return dict(self.servicer.seconds)

    @property
    def unimplemented_calls(self) -> list[str]:
        """Names of RPCs the SDK called that the emulator does not implement."""
        return list(self.servicer.unimplemented)

    @property
    def image_requests(self) -> list[tuple[str, str | None]]:
        """``(image id, registry ref)`` for every ImageGetOrCreate received."""
        return list(self.servicer.image_requests)

    def record(self, sandbox_id: str) -> CreateRecord:
        """The create record of one sandbox."""
        for rec in self.creates:
            if rec.sandbox_id == sandbox_id:
                return rec
        raise KeyError(sandbox_id)
