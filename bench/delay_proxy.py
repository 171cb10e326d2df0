"""A delaying, counting DNS proxy (UDP and TCP) in front of the authoritative upstream.

nsd cannot add latency, so this sits between the caches and nsd: every query waits `--delay-ms`
before it is forwarded (UDP) to the upstream, and its (name, type) is counted. On SIGUSR1 the
counters are written as JSON to `--stats`. Used by the coalescing benchmark (how many queries
reached the upstream) and by the crawler burst (50 ms per upstream query, like a real recursive
resolver answering from far away).

    python -m bench.delay_proxy --listen 127.0.0.1:5301 --upstream 127.0.0.1:5300 --delay-ms 50
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import signal
import socket
import struct


def big_udp_socket(bind: tuple[str, int] | None = None) -> socket.socket:
    """A UDP socket with 8 MiB buffers (SO_*BUFFORCE as root), so bursts are not dropped."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for force, plain in ((33, socket.SO_RCVBUF), (32, socket.SO_SNDBUF)):  # SO_RCVBUFFORCE, SO_SNDBUFFORCE
        try:
            s.setsockopt(socket.SOL_SOCKET, force, 8 << 20)
        except OSError:
            s.setsockopt(socket.SOL_SOCKET, plain, 8 << 20)
    s.setblocking(False)
    if bind:
        s.bind(bind)
    return s


def qkey(data: bytes) -> str:
    """'name/type' of the first question, name lowercased ('' if unreadable)."""
    try:
        i, labels = 12, []
        while data[i]:
            n = data[i]
            labels.append(data[i + 1:i + 1 + n].decode("ascii", "replace"))
            i += n + 1
        qtype = struct.unpack("!H", data[i + 1:i + 3])[0]
        return ".".join(labels).lower() + "/" + str(qtype)
    except (IndexError, struct.error):
        return ""


class Proxy:
    def __init__(self, upstream: tuple[str, int], delay: float) -> None:
        self.upstream = upstream
        self.delay = delay
        self.counts: collections.Counter[str] = collections.Counter()
        self.total = 0
        self.pending: dict[int, tuple] = {}
        self.next_id = 0
        self.up: asyncio.DatagramTransport | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        proxy = self

        class Up(asyncio.DatagramProtocol):
            def datagram_received(self, data, addr):
                proxy.from_upstream(data)

        sock = big_udp_socket()
        sock.connect(self.upstream)
        self.up, _ = await loop.create_datagram_endpoint(Up, sock=sock)

    def forward(self, data: bytes, reply_cb) -> None:
        self.total += 1
        self.counts[qkey(data)] += 1
        asyncio.get_running_loop().call_later(self.delay, self._send, data, reply_cb)

    def _send(self, data: bytes, reply_cb) -> None:
        for _ in range(65536):
            self.next_id = (self.next_id + 1) & 0xFFFF
            if self.next_id not in self.pending:
                break
        nid = self.next_id
        loop = asyncio.get_running_loop()
        h = loop.call_later(10.0, self.pending.pop, nid, None)
        self.pending[nid] = (data[:2], reply_cb, h)
        self.up.sendto(struct.pack("!H", nid) + data[2:])

    def from_upstream(self, data: bytes) -> None:
        if len(data) < 12:
            return
        ent = self.pending.pop(struct.unpack("!H", data[:2])[0], None)
        if ent is None:
            return
        orig_id, reply_cb, h = ent
        h.cancel()
        reply_cb(orig_id + data[2:])

    def dump(self, path: str) -> None:
        with open(path + ".tmp", "w") as f:
            json.dump({"total": self.total, "counts": dict(self.counts)}, f)
        import os

        os.replace(path + ".tmp", path)


async def main_async(a) -> None:
    loop = asyncio.get_running_loop()
    lhost, lport = a.listen.rsplit(":", 1)
    uhost, uport = a.upstream.rsplit(":", 1)
    proxy = Proxy((uhost, int(uport)), a.delay_ms / 1000.0)
    await proxy.start()

    class Udp(asyncio.DatagramProtocol):
        def connection_made(self, transport):
            self.t = transport

        def datagram_received(self, data, addr):
            if len(data) >= 12 and not data[2] & 0x80:
                proxy.forward(data, lambda r, addr=addr: self.t.sendto(r, addr))

    async def tcp_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                n = struct.unpack("!H", await reader.readexactly(2))[0]
                data = await reader.readexactly(n)
                fut = loop.create_future()
                proxy.forward(data, lambda r, fut=fut: fut.done() or fut.set_result(r))
                r = await asyncio.wait_for(fut, 10)
                writer.write(struct.pack("!H", len(r)) + r)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()

    udp, _ = await loop.create_datagram_endpoint(Udp, sock=big_udp_socket((lhost, int(lport))))
    server = await asyncio.start_server(tcp_client, lhost, int(lport))
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    if a.stats:
        loop.add_signal_handler(signal.SIGUSR1, proxy.dump, a.stats)
        proxy.dump(a.stats)
    await stop.wait()
    if a.stats:
        proxy.dump(a.stats)
    udp.close()
    server.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", default="127.0.0.1:5301")
    ap.add_argument("--upstream", default="127.0.0.1:5300")
    ap.add_argument("--delay-ms", type=float, default=0.0)
    ap.add_argument("--stats", help="write counters here (JSON) at start, on SIGUSR1 and at exit")
    a = ap.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main_async(a))


if __name__ == "__main__":
    main()
