"""Run the emulator standalone: ``python -m sandboxnb.testing.modal_emulator``; prints its env."""

from __future__ import annotations

import shlex
import threading

from sandboxnb.testing.modal_emulator import ModalEmulator


def main() -> None:
    with ModalEmulator(set_env=False) as emu:
        for key, value in emu.env().items():
            print(f"export {key}={shlex.quote(value)}", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
