"""The Modal SDK session of one ``ModalProvider``: credentials, one client and App, and images
resolved once each (behind a lock, so concurrent first rollouts never race a build)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

from sandboxnb.errors import ProviderError
from sandboxnb.providers.base import Availability

__all__ = ["PUBLISHED_PREFIX", "ModalSession", "availability", "credentials", "is_image"]

PUBLISHED_PREFIX = "modal://"


def credentials() -> tuple[str | None, str | None, str]:
    """(token id, token secret, where they came from) as the Modal SDK would resolve them."""
    env_id, env_secret = os.environ.get("MODAL_TOKEN_ID"), os.environ.get("MODAL_TOKEN_SECRET")
    if env_id and env_secret:
        return env_id, env_secret, "MODAL_TOKEN_ID/MODAL_TOKEN_SECRET"
    try:
        from modal.config import config, user_config_path
    except ImportError:
        return None, None, ""
    return config.get("token_id"), config.get("token_secret"), f"profile in {user_config_path}"


def availability() -> Availability:
    """Available when the SDK imports and credentials are configured the SDK's way."""
    try:
        import modal  # noqa: F401
    except ImportError:
        return Availability(False, "the modal SDK is missing: pip install 'sandboxnb[modal]'")
    token_id, token_secret, source = credentials()
    if not (token_id and token_secret):
        return Availability(False, "no Modal credentials: set MODAL_TOKEN_ID and "
                            "MODAL_TOKEN_SECRET, or run `modal token new` (profile in "
                            "~/.modal.toml, or MODAL_CONFIG_PATH/MODAL_PROFILE)")
    server = os.environ.get("MODAL_SERVER_URL")
    return Availability(True, f"credentials from {source}" + (f" at {server}" if server else ""))


def is_image(value: Any) -> bool:
    try:
        import modal
    except ImportError:
        return False
    return isinstance(value, modal.Image)


class ModalSession:
    """The SDK client and App a provider's sandboxes belong to, opened on first use."""

    def __init__(self, app_name: str, environment_name: str | None,
                 token: tuple[str, str] | None) -> None:
        self.app_name, self.environment_name, self._token = app_name, environment_name, token
        self.client: Any = None
        self.app: Any = None
        self._lock = asyncio.Lock()
        self._image_locks: dict[Any, asyncio.Lock] = {}
        self._images: dict[Any, Any] = {}

    async def open(self) -> tuple[Any, Any]:
        """``(client, app)``, created once (the App if missing)."""
        import modal

        async with self._lock:
            if self.app is None:
                token_id, token_secret = self._token or credentials()[:2]
                if not (token_id and token_secret):
                    raise ProviderError(f"modal: {availability().reason}")
                client = await modal.Client.from_credentials.aio(token_id, token_secret)
                try:
                    self.app = await modal.App.lookup.aio(
                        self.app_name, create_if_missing=True, client=client,
                        environment_name=self.environment_name)
                except modal.exception.Error as err:
                    with contextlib.suppress(Exception):
                        await client.close.aio()
                    raise ProviderError(f"modal: cannot open app {self.app_name!r} "
                                        f"({type(err).__name__}: {err})") from err
                self.client = client
        return self.client, self.app

    async def image(self, ref: Any) -> Any:
        """A built ``modal.Image`` for a registry reference, ``modal://NAME``, ``im-...`` or a
        ``modal.Image``; each resolved once."""
        import modal

        key = ref if isinstance(ref, str) else id(ref)
        async with self._image_locks.setdefault(key, asyncio.Lock()):
            if key not in self._images:
                image = ref
                if isinstance(ref, str) and ref.startswith(PUBLISHED_PREFIX):
                    image = modal.Image.from_name(ref[len(PUBLISHED_PREFIX):])
                elif isinstance(ref, str):
                    image = (modal.Image.from_id if ref.startswith("im-")
                             else modal.Image.from_registry)(ref)
                try:
                    await image.build.aio((await self.open())[1])
                except modal.exception.Error as err:
                    raise ProviderError(f"modal: image {ref!r} could not be resolved "
                                        f"({type(err).__name__}: {err})") from err
                self._images[key] = image
        return self._images[key]

    async def close(self) -> None:
        client, self.client, self.app = self.client, None, None
        self._images.clear()
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close.aio()
