"""An emulator of Modal's control plane for tests and benchmarks.

The unmodified ``modal`` SDK talks to it over gRPC (``MODAL_SERVER_URL``). Each sandbox it creates
is a real isolated process tree (:class:`sandboxnb.testing.isolation.IsolatedSandbox`) running the
create request's entrypoint; its ports are reachable only through emulated tunnels: TLS listeners
on ``127.0.0.1`` with a certificate signed by a throwaway CA (``emulator.ca_file``), or plain TCP
for ``unencrypted_ports``. RPCs the emulator does not implement fail with UNIMPLEMENTED and are
listed in ``emulator.unimplemented_calls``.

    with ModalEmulator() as emu:          # sets MODAL_SERVER_URL, tokens, SANDBOXNB_TLS_CA_FILE
        ...                               # use modal / ModalProvider
        emu.creates[-1].gpu, emu.live_sandboxes(), emu.unimplemented_calls
"""

from sandboxnb.testing.modal_emulator._emulator import ModalEmulator
from sandboxnb.testing.modal_emulator._sandbox import CreateRecord, TunnelInfo

__all__ = ["CreateRecord", "ModalEmulator", "TunnelInfo"]
