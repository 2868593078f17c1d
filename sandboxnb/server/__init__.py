"""The sandbox server: runs inside every sandbox and speaks the wire format of :mod:`.wire`.

The one stdlib-only zone of sandboxnb: every module here runs under any ``python3`` >= 3.9 found
in a sandbox image (enforced by ``ruff.toml`` beside this file and by the test suite). Host-side
code ships it with :mod:`sandboxnb.bundle`, a zipapp run as ``python3 -S -E -s X.pyz [options]``;
from a checkout, ``python3 -m sandboxnb.server [options]`` runs it too.

One purpose per module:

- ``wire``: frames, protocol version, size limits, error codes (the client imports it too)
- ``options``: the command line and the token's environment variable
- ``listen``: the listening socket (TCP, Unix, or one inherited from the launcher)
- ``lifecycle``: the server object, accept loop, dead-man switch, owner watch, shutdown
- ``connection``: one client connection: framed reads and writes, the token handshake, dispatch
- ``handlers``: the method table and the small requests (ping, cancel, shutdown)
- ``params``: request parameter validation
- ``files``: ``write_file`` / ``read_file``
- ``jobs``: requests that run on their own thread and can be cancelled
- ``execjob``: ``exec``: a process group, streamed output, timeout, kill
- ``pyjob``: ``python``: one call into the worker, with timeout, interrupt and reset
- ``pyprocess``: the Python worker process as the server sees it
- ``pyworker``: the Python worker itself (runs in the child, holds the namespace)
- ``log``: diagnostics on stderr

Startup is kept short on purpose: before the READY line only low-level modules load (``_socket``,
``_thread``, ``os``, ``time``) and ``json`` for the wire; no ``socket``, ``threading``,
``subprocess`` or ``argparse``. The modules behind ``exec``, ``python`` and the file methods,
and the stdlib they need, load on first use. This ``__init__`` imports nothing, so
``from sandboxnb.server import wire`` stays cheap for the client.
"""
