"""A bare Python UDP DNS responder: the floor for any Python DNS cache on this machine.

Per query it does one dict lookup on the question bytes and patches the ID into a pre-built
reply (built once per question with dnslib, off the hot path). No TTL countdown, no EDNS, no
parsing: whatever a real cache in Python does on a hit is extra work on top of this.

    python -m bench.bare_responder --port 5330 [--asyncio]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal

from dnslib import QTYPE, RR, A, DNSRecord


class Responder(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.replies: dict[bytes, bytes] = {}
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        r = self.replies.get(data[2:])
        if r is None:
            r = self._build(data)
            if r is None:
                return
        self.transport.sendto(data[:2] + r, addr)

    def _build(self, data: bytes) -> bytes | None:
        try:
            q = DNSRecord.parse(data)
        except Exception:
            return None
        rep = q.reply(ra=1, aa=0)
        if q.q.qtype == QTYPE.A:
            rep.add_answer(RR(q.q.qname, QTYPE.A, rdata=A("127.9.9.9"), ttl=3600))
        body = bytes(rep.pack())[2:]
        self.replies[data[2:]] = body
        return body


async def main_async(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(Responder, local_addr=(host, port))
    stop = asyncio.Event()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)
    await stop.wait()
    transport.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=5330)
    ap.add_argument("--asyncio", action="store_true", help="plain asyncio, never uvloop")
    a = ap.parse_args()
    if not a.asyncio and not os.environ.get("DNS_SIDECAR_NO_UVLOOP"):
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
    asyncio.run(main_async(a.host, a.port))


if __name__ == "__main__":
    main()
