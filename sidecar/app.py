"""The process: the DNS side (:mod:`sidecar.server`), then the HTTP API over it; signals,
lame duck and drain.

:class:`Sidecar` is the in-process object tests and embedders use (DNS and API together);
:func:`run` is the process main.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from sidecar.config import Config, HostPort
from sidecar.ops.api import ApiServer
from sidecar.server import DRAIN_SECONDS, DnsServer, tune_gc

log = logging.getLogger("sidecar")


class Sidecar(DnsServer):
    """The DNS side plus its HTTP API (``--http``). ``await start()``, then
    ``dns_addresses`` / ``http_address`` tell where it listens; ``await stop()`` drains and
    closes."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.http_address: HostPort | None = None
        self._api: ApiServer | None = None
        self._saver: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Load the cache snapshot (``--cache-file``), bind every listener and the API;
        raise :class:`StartupError` when one cannot be bound."""
        if self.snapshot is not None:
            # Before the listeners are bound: the load is synchronous, so no query waits
            # behind it, the first query already sees the warm cache, and /readyz (served
            # only once the API is up, after this) cannot say ready before it. With
            # --reuse-port the old process keeps answering meanwhile.
            self.snapshot.load()
        await super().start()
        if self.config.http is not None:
            self._api = ApiServer(self)
            try:
                self.http_address = await self._api.start(self.config.http)
            except BaseException:
                await self.stop(drain=0)
                raise
        if self.snapshot is not None and self.snapshot.interval > 0:
            self._saver = asyncio.get_running_loop().create_task(self.snapshot.run())
        log.info("dns-sidecar %s; http %s%s", self.describe(), self.http_address or "off",
                 f"; cache file {self.snapshot.path}" if self.snapshot else "")

    async def save_snapshot(self) -> None:
        """Write the snapshot now, when there is one (a failure is one log line)."""
        if self.snapshot is not None:
            await self.snapshot.save()

    async def stop(self, drain: float = DRAIN_SECONDS) -> None:
        """Stop taking queries, answer what is in flight (up to ``drain`` s), write the
        snapshot (``--cache-file``: after the drain, so it holds the drained answers too),
        close all."""
        if self._saver is not None:
            # A periodic save under way completes (SnapshotStore.save is shielded); the
            # final save below waits for it.
            self._saver.cancel()
            self._saver = None
        await self.drain(drain)
        await self.save_snapshot()
        if self._api is not None:
            await self._api.stop()
            self._api = None
        await self.close()


async def serve(config: Config) -> int:
    """Run until SIGTERM/SIGINT; lame duck first when configured. Returns the exit code."""
    sidecar = Sidecar(config)
    await sidecar.start()
    tune_gc()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    got: list[int] = []

    def on_signal(signum: int) -> None:
        if got:
            log.warning("second signal: stopping now")
            os._exit(0)
        got.append(signum)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    reloads: set[asyncio.Task] = set()

    def on_hup() -> None:
        task = loop.create_task(sidecar.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    await stop.wait()
    name = signal.Signals(got[0]).name
    if config.lameduck > 0:
        sidecar.lameduck = True
        log.info("%s: lame duck for %.1fs (not ready, still answering)", name, config.lameduck)
    # A snapshot at once, before the drain: a replacement started now (beside this process
    # with --reuse-port, or after it on the same file) loads what this one knows. It runs
    # during the lame duck (which lasts at least as long as the save); stop() saves again
    # after the drain.
    await asyncio.gather(sidecar.save_snapshot(), asyncio.sleep(config.lameduck))
    log.info("%s: draining and stopping", name)
    await sidecar.stop()
    log.info("stopped")
    return 0


def run(config: Config) -> int:
    """Process entry: logging, event loop (uvloop when installed), serve."""
    from sidecar.log import setup_logging

    setup_logging(config.log_level, config.log_format)
    use_uvloop = os.environ.get("DNS_SIDECAR_NO_UVLOOP", "") in ("", "0")
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            use_uvloop = False
    if use_uvloop:
        return uvloop.run(serve(config))
    return asyncio.run(serve(config))
