"""Connections to one Valkey/Redis server that the shared cache owns, a batch at a time each.

On a single server every lookup batch, write batch and poll is one command, and each holds
a connection for its round trip anyway (the batcher's bound is the number of connections).
redis-py's pipeline and pool layers around such a call (a pipeline object, the pool's lock
and checks, the retry wrapper, its observability hooks) cost more CPU than the round trip
itself, and a cold burst pays them per batch. A lane is one redis-py connection (its
handshake, AUTH, db, TLS, command packing and hiredis reply parsing, all redis-py's) used
directly: send the commands, read their replies.

A connection whose call failed or was cancelled mid-way is disconnected by redis-py itself
(its ``send_packed_command`` and ``read_response`` do so on any exception, its handshake's
commands included), so a late reply is never read as the next call's; the next call on that
lane connects again. Both cases are tested by cutting calls short with a paused server.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import ResponseError


class Lanes:
    """``count`` connections made by ``pool`` (its URL's settings), used one call at a time
    each. The caller bounds the calls in flight to ``count`` (``call`` takes a free lane and
    there must be one)."""

    def __init__(self, pool: ConnectionPool, count: int) -> None:
        self._free: list[AbstractConnection] = [pool.make_connection() for _ in range(count)]
        self._all = list(self._free)

    async def call(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """The replies of ``commands``, sent together on one connection. An error reply is
        raised after every reply was read (the connection stays in step); the first one."""
        conn = self._free.pop()
        try:
            await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
            replies = []
            error: ResponseError | None = None
            for _ in commands:
                try:
                    replies.append(await conn.read_response())
                except ResponseError as exc:
                    error = error or exc
                    replies.append(exc)
            if error is not None:
                raise error
            return replies
        finally:
            self._free.append(conn)

    async def open(self) -> None:
        """Connect every lane (concurrently)."""
        await asyncio.gather(*(c.connect() for c in self._all if not c.is_connected))

    async def close(self) -> None:
        for c in self._all:
            await c.disconnect(nowait=True)
