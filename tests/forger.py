"""A port-recording test upstream and an off-path reply forger, for the RFC 5452 tests.

``RecordingUpstream`` is a bare UDP responder on loopback that remembers the source port and
ID of every query it gets, and can hold its answers back (``hold``), delay them
(``latency``) or drop packets (``drop_next``). ``forge`` sends a forged answer for one question with every DNS ID from the
upstream's own address and port, as a spoofing attacker would, to one destination port.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass

_A_IN = struct.pack(">HH", 1, 1)


@dataclass(frozen=True)
class Seen:
    port: int
    qid: int
    question: bytes  # wire question section (name, type, class) as received


def _question(data: bytes) -> bytes | None:
    i = 12
    while i < len(data):
        n = data[i]
        if n == 0:
            end = i + 5
            return data[12:end] if end <= len(data) else None
        if n & 0xC0:
            return None
        i += n + 1
    return None


def answer(qid: int, question: bytes, addr: str, ttl: int) -> bytes:
    """A NOERROR reply for ``question`` with one A record (``addr``, ``ttl``)."""
    rdata = bytes(int(x) for x in addr.split("."))
    return (struct.pack(">HHHHHH", qid, 0x8180, 1, 1, 0, 0) + question
            + b"\xc0\x0c" + _A_IN + struct.pack(">IH", ttl, 4) + rdata)


class RecordingUpstream(asyncio.DatagramProtocol):
    """Answers every query with ``A 10.0.0.1`` (TTL 300), echoing the question bytes."""

    ADDRESS = "10.0.0.1"

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.seen: list[Seen] = []
        self.hold = False
        self.drop_next = 0
        self.latency = 0.0  # seconds before each answer
        self._held: list[tuple[Seen, tuple]] = []
        self._waiters: list[tuple[int, asyncio.Future]] = []

    @classmethod
    async def start(cls) -> RecordingUpstream:
        loop = asyncio.get_running_loop()
        _t, proto = await loop.create_datagram_endpoint(cls, local_addr=("127.0.0.1", 0))
        return proto

    @property
    def port(self) -> int:
        assert self.transport is not None
        return self.transport.get_extra_info("sockname")[1]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        question = _question(data)
        if len(data) < 12 or question is None or data[2] & 0x80:
            return
        seen = Seen(addr[1], struct.unpack_from(">H", data)[0], question)
        self.seen.append(seen)
        for n, fut in self._waiters:
            if len(self.seen) >= n and not fut.done():
                fut.set_result(None)
        if self.drop_next:
            self.drop_next -= 1
        elif self.hold:
            self._held.append((seen, addr))
        elif self.latency > 0:
            asyncio.get_running_loop().call_later(self.latency, self._send, seen, addr)
        else:
            self._send(seen, addr)

    def _send(self, seen: Seen, addr: tuple) -> None:
        if self.transport is not None:
            self.transport.sendto(answer(seen.qid, seen.question, self.ADDRESS, 300), addr)

    def release(self) -> None:
        """Answer the held queries now, and the next ones at once."""
        self.hold = False
        held, self._held = self._held, []
        for seen, addr in held:
            self._send(seen, addr)

    async def wait_for(self, n: int, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Return once ``n`` queries have arrived."""
        if len(self.seen) >= n:
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((n, fut))
        try:
            await asyncio.wait_for(fut, timeout)
        finally:
            self._waiters.remove((n, fut))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def forge(upstream: RecordingUpstream, port: int, question: bytes,
                addr: str = "6.6.6.6", ttl: int = 86400, chunk: int = 512) -> int:
    """Send the forged answer with every ID 0..65535 to ``127.0.0.1:port``, from the
    upstream's own address and port; returns the number sent.

    Sent in chunks with a loop pass in between, so an in-process sidecar reads them as
    they come (a burst larger than its socket buffer would mostly be dropped by the
    kernel, which would understate what a forger achieves against a fixed port).
    """
    transport = upstream.transport
    assert transport is not None
    template = bytearray(answer(0, question, addr, ttl))
    sent = 0
    for qid in range(65536):
        template[0:2] = qid.to_bytes(2, "big")
        transport.sendto(bytes(template), ("127.0.0.1", port))
        sent += 1
        if sent % chunk == 0:
            await asyncio.sleep(0)
    return sent
