"""A TCP relay that delays traffic, for network emulation without kernel netem.

Each direction of each connection delivers every byte `delay_s` after it arrived (order kept,
no bandwidth limit), so a round trip through the relay gains 2 * delay_s. `drop()` cuts every
open connection, as a flaky link would.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time


class DelayRelay:
    def __init__(self, target: str, delay_s: float = 0.0, host: str = "127.0.0.1"):
        """target: "host:port" to forward to; delay_s: one-way delay added."""
        self.target_host, port = target.rsplit(":", 1)
        self.target_port = int(port)
        self.delay_s, self.host = delay_s, host
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> DelayRelay:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._accept, self.host, 0), self._loop
        ).result()
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def drop(self) -> None:
        """Close every open connection (new ones are still accepted)."""
        asyncio.run_coroutine_threadsafe(self._drop(), self._loop).result()

    def stop(self) -> None:
        """Stop accepting, cut every connection, end the loop with no task left running."""

        async def shutdown():
            self._server.close()
            await self._drop()  # the pipes see EOF and end by themselves
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            if tasks:
                _, pending = await asyncio.wait(tasks, timeout=1.0)
                for t in pending:  # a stuck one (its own cancellation ends it quietly)
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()

    async def _drop(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _accept(self, reader, writer) -> None:
        # the server's task for one connection: it must end quietly however the connection
        # ends (asyncio logs a traceback for a failed or cancelled one)
        writers = [writer]
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
            writers.append(up_writer)
            self._writers.update(writers)
            await asyncio.gather(
                self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
            )
        except (OSError, asyncio.CancelledError):
            pass  # no upstream, or stop() cancelled a connection that did not end
        finally:
            for w in writers:
                self._writers.discard(w)
                w.close()

    async def _pipe(self, reader, writer) -> None:
        queue: asyncio.Queue = asyncio.Queue()

        async def deliver():
            while (item := await queue.get()) is not None:
                due, data = item
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if writer.is_closing():
                    return  # cut (drop, stop, the peer): the rest has nowhere to go
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()

        delivering = asyncio.ensure_future(deliver())
        try:
            while data := await reader.read(65536):
                queue.put_nowait((time.monotonic() + self.delay_s, data))
        except ConnectionError:
            pass  # reset by the peer: deliver what came, then end
        finally:
            queue.put_nowait(None)
            with contextlib.suppress(ConnectionError, OSError):
                await delivering
