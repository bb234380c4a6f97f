"""A TCP relay on loopback whose downstream bytes share one rate: a pod's link, for the S3 server only.

`tc` on `lo` would cap every loopback connection on the machine (vLLM's own sockets, other tests); this
caps only what goes through the relay, all its connections together, as one NIC would:

    with ThrottledLink(("127.0.0.1", s3_port), rate=24e6) as link:
        env["MINIO_ENDPOINT"] = link.endpoint      # the agent signs for the relay's host:port

Bytes from the server to the client wait for tokens of one bucket (burst: 64 KiB); bytes to the server
pass as they come. The relay speaks no HTTP, so SigV4 and presigned URLs work unchanged as long as the
client addresses the relay itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from types import TracebackType

CHUNK = 64 * 1024


class _Bucket:
    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = float(CHUNK)
        self.stamp = time.monotonic()
        self.lock = asyncio.Lock()

    async def take(self, n: int) -> None:
        async with self.lock:  # one queue for every connection: they share the link
            while True:
                now = time.monotonic()
                self.tokens = min(float(CHUNK), self.tokens + (now - self.stamp) * self.rate)
                self.stamp = now
                if self.tokens >= n:
                    self.tokens -= n
                    return
                await asyncio.sleep((n - self.tokens) / self.rate)


class ThrottledLink:
    def __init__(self, upstream: tuple[str, int], rate: float, host: str = "127.0.0.1") -> None:
        self.upstream = upstream
        self.rate = rate
        self.host = host
        self.port = 0
        self.bytes_down = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="throttle", daemon=True)
        self._server: asyncio.base_events.Server | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def __enter__(self) -> ThrottledLink:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _start(self) -> asyncio.base_events.Server:
        self._bucket = _Bucket(self.rate)
        return await asyncio.start_server(self._relay, self.host, 0)

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_w.close()
            return
        up = asyncio.ensure_future(self._pipe(client_r, server_w, throttle=False))
        down = asyncio.ensure_future(self._pipe(server_r, client_w, throttle=True))
        await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        for task in (up, down):
            task.cancel()
        for writer in (client_w, server_w):
            with contextlib.suppress(Exception):
                writer.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                    throttle: bool) -> None:
        with contextlib.suppress(ConnectionError, asyncio.CancelledError, OSError):
            while data := await reader.read(CHUNK):
                if throttle:
                    await self._bucket.take(len(data))
                    self.bytes_down += len(data)
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(Exception):
            writer.write_eof()
