"""An emulated Daytona cloud for tests: REST API, toolbox and SSH gateway over real isolated
sandboxes (see :class:`DaytonaEmulator`). Pinned to the ``daytona`` SDK 0.226.1."""

from sandboxnb.testing.daytona_emulator.emulator import SDK_VERSION, DaytonaEmulator
from sandboxnb.testing.daytona_emulator.state import EmulatedSandbox, EmulatedSnapshot

__all__ = ["SDK_VERSION", "DaytonaEmulator", "EmulatedSandbox", "EmulatedSnapshot"]
