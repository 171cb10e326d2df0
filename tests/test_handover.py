"""Replacement without a lost query: two listener sets on one address (``--reuse-port``).

The listener-level half: the newer listeners take every new datagram and connection as soon
as they are bound, and keep them once the old ones close. The process-level half (a real
replacement under a steady stream of queries) is in tests/test_process_handover.py.
"""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from sidecar.config import HostPort
from sidecar.dns import reuseport
from sidecar.dns.listeners import close_listeners, open_listeners

LOOPBACK = "127.0.0.1"
QUERIES = 300


def responder(tag: bytes):
    """A handle that answers every message with ``tag`` after its two ID bytes."""
    def handle(data: bytes, host: str, tcp: bool) -> bytes:
        return data[:2] + tag
    return handle


async def open_set(tag: bytes, port: int, reuse_port: bool):
    return await open_listeners((HostPort(LOOPBACK, port),), responder(tag), rcvbuf=0,
                                tcp_max_connections=64, tcp_idle_timeout=5.0,
                                reuse_port=reuse_port)


async def ask_udp(port: int, n: int) -> list[bytes]:
    """``n`` queries, each from a fresh source port (the kernel's hash spreads those)."""
    loop = asyncio.get_running_loop()
    tags = []
    for i in range(n):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            await loop.sock_connect(s, (LOOPBACK, port))
            await loop.sock_sendall(s, struct.pack(">H", i) + b"q")
            data = await asyncio.wait_for(loop.sock_recv(s, 64), 5)
            assert data[:2] == struct.pack(">H", i)
            tags.append(data[2:])
    return tags


async def ask_tcp(port: int, n: int) -> list[bytes]:
    tags = []
    for i in range(n):
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        msg = struct.pack(">H", i) + b"q"
        writer.write(struct.pack(">H", len(msg)) + msg)
        size = struct.unpack(">H", await asyncio.wait_for(reader.readexactly(2), 5))[0]
        data = await asyncio.wait_for(reader.readexactly(size), 5)
        writer.close()
        await writer.wait_closed()
        tags.append(data[2:])
    return tags


async def test_newest_listeners_take_all_new_traffic_and_keep_it():
    old_u, old_t, bound, _ = await open_set(b"old", 0, True)
    port = bound[0].port
    try:
        assert set(await ask_udp(port, 20)) == {b"old"}
        new_u, new_t, _b, _ = await open_set(b"new", port, True)
        try:
            # Without the steering the hash would give the old set about half of these.
            assert set(await ask_udp(port, QUERIES)) == {b"new"}
            assert set(await ask_tcp(port, QUERIES // 3)) == {b"new"}
            await close_listeners(old_u, old_t, drain=0)
            old_u, old_t = [], []
            assert set(await ask_udp(port, QUERIES // 3)) == {b"new"}
            assert set(await ask_tcp(port, QUERIES // 6)) == {b"new"}
        finally:
            await close_listeners(new_u, new_t, drain=0)
    finally:
        await close_listeners(old_u, old_t, drain=0)


async def test_without_reuse_port_a_second_sidecar_cannot_bind():
    from sidecar.errors import StartupError

    u, t, bound, _ = await open_set(b"one", 0, False)
    try:
        with pytest.raises(StartupError, match="cannot listen"):
            await open_set(b"two", bound[0].port, True)
    finally:
        await close_listeners(u, t, drain=0)


def test_steering_program_is_accepted_by_the_kernel():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((LOOPBACK, 0))
        assert reuseport.steer_to(s) is True
