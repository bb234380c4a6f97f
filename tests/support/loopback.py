"""A threaded HTTP server on a free loopback port, served from a daemon thread: the lifecycle that the
fake Hub (`fake_hub.FakeHub`) and the fault proxy (`fault_server.FaultProxy`) share.

A subclass says how to build its `ThreadingHTTPServer` (`_make_server`) and may hook `_on_start` and
`_on_stop` (the fault proxy ends its stalls there); `start` and `stop` are idempotent, and the object is
its own context manager.
"""

from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer
from types import TracebackType
from typing import TypeVar

HOST = "127.0.0.1"

S = TypeVar("S", bound="LoopbackServer")


class LoopbackServer:
    thread_name = "loopback-server"
    poll_interval = 0.5  # seconds between serve_forever's checks for shutdown
    not_started = "the server is not started"

    def __init__(self) -> None:
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def _make_server(self) -> ThreadingHTTPServer:
        raise NotImplementedError

    def _on_start(self) -> None:
        """Called before the server is built."""

    def _on_stop(self) -> None:
        """Called before the server shuts down (wake anything that would hold a handler)."""

    def start(self: S) -> S:
        if self._server is None:
            self._on_start()
            self._server = self._make_server()
            self._thread = threading.Thread(target=self._server.serve_forever, args=(self.poll_interval,),
                                            name=self.thread_name, daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting and close the socket. Idempotent."""
        self._on_stop()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self: S) -> S:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError(self.not_started)
        return int(self._server.server_address[1])
