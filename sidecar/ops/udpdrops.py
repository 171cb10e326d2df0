"""What the kernel knows about UDP datagrams dropped before the sidecar could read them (Linux).

When a UDP socket's receive buffer is full the kernel drops the datagram: the client sees a
timeout and no counter of the sidecar moves. Linux counts these drops per socket (the
``drops`` column of ``/proc/net/udp`` and ``/proc/net/udp6``, matched to a socket by its
inode) and per network namespace (``Udp: RcvbufErrors`` and ``InErrors`` in
``/proc/net/snmp``, ``Udp6RcvbufErrors`` and ``Udp6InErrors`` in ``/proc/net/snmp6``).

The readers return None (or an empty dict) where those files do not exist (not Linux, no
procfs). They are plain procfs reads (no disk I/O); ``/proc/net/udp`` has one short line per
UDP socket of the namespace.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable
from typing import Protocol

#: Where the tables and counters are; tests point it at a directory of their own.
PROC_NET = "/proc/net"
#: Socket tables with a ``drops`` column (IPv4, IPv6).
SOCKET_TABLES = ("udp", "udp6")
#: The ``inode`` field of a socket-table line: sl, local, remote, st, tx:rx, tr:when,
#: retrnsmt, uid, timeout, inode, ref, pointer, drops (the header names more columns than a
#: line has fields: ``tx_queue rx_queue`` and ``tr tm->when`` are one field each).
INODE_FIELD = 9


class Socket(Protocol):
    """A socket, or the ``TransportSocket`` of ``transport.get_extra_info("socket")``."""

    def fileno(self) -> int: ...


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.read()
    except FileNotFoundError:
        return None


def socket_inode(sock: Socket) -> int | None:
    """The inode of an open socket (the ``inode`` column of ``/proc/net/udp``); None once it
    is closed."""
    fd = sock.fileno()
    if fd < 0:
        return None
    try:
        return os.fstat(fd).st_ino
    except OSError:
        return None


def parse_socket_drops(text: str, inodes: Collection[str]) -> dict[int, int]:
    """``{inode: drops}`` for the sockets of ``inodes`` (decimal strings) listed in the text
    of ``/proc/net/udp`` or ``/proc/net/udp6`` (header line first, ``drops`` last)."""
    out: dict[int, int] = {}
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) > INODE_FIELD and fields[INODE_FIELD] in inodes:
            out[int(fields[INODE_FIELD])] = int(fields[-1])
    return out


def read_socket_drops(inodes: Iterable[int], proc: str = PROC_NET) -> dict[int, int] | None:
    """``{inode: drops}`` of the UDP sockets ``inodes`` (sockets of other network namespaces,
    or closed, are left out); None when neither ``udp`` nor ``udp6`` table exists."""
    wanted = {str(i) for i in inodes}
    texts = [t for t in (_read(os.path.join(proc, name)) for name in SOCKET_TABLES)
             if t is not None]
    if not texts:
        return None
    out: dict[int, int] = {}
    for text in texts:
        out.update(parse_socket_drops(text, wanted))
    return out


def udp_socket_drops(socks: Iterable[Socket], proc: str = PROC_NET) -> int | None:
    """Datagrams the kernel dropped on ``socks`` (nearly always because the receive buffer was
    full), summed since each socket was opened; None when the kernel does not say (not
    Linux)."""
    inodes = [i for i in map(socket_inode, socks) if i is not None]
    drops = read_socket_drops(inodes, proc)
    return None if drops is None else sum(drops.values())


def parse_snmp(text: str, group: str = "Udp") -> dict[str, int]:
    """The counters of ``group`` in the text of ``/proc/net/snmp`` (a line of names, then a
    line of values, both starting ``Udp:``); empty when the group is missing."""
    rows = [line.split()[1:] for line in text.splitlines() if line.startswith(group + ":")]
    if len(rows) < 2:
        return {}
    return dict(zip(rows[0], map(int, rows[1]), strict=True))


def parse_snmp6(text: str, prefix: str = "Udp6") -> dict[str, int]:
    """The counters named ``prefix...`` in the text of ``/proc/net/snmp6`` (``name value``
    lines), keyed by their full name (``Udp6RcvbufErrors``)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0].startswith(prefix):
            out[fields[0]] = int(fields[1])
    return out


def udp_namespace_counters(proc: str = PROC_NET) -> dict[str, int]:
    """The network namespace's UDP counters since boot: the ``Udp:`` group of
    ``/proc/net/snmp`` (``RcvbufErrors``, ``InErrors``, ...) and the ``Udp6*`` counters of
    ``/proc/net/snmp6`` (``Udp6RcvbufErrors``, ``Udp6InErrors``, ...). Empty when neither
    file exists."""
    snmp = _read(os.path.join(proc, "snmp"))
    snmp6 = _read(os.path.join(proc, "snmp6"))
    return {**(parse_snmp(snmp) if snmp else {}), **(parse_snmp6(snmp6) if snmp6 else {})}


def host_rcvbuf_errors(proc: str = PROC_NET) -> int | None:
    """Datagrams dropped for a full receive buffer on any UDP socket of the network namespace
    (IPv4 ``RcvbufErrors`` + IPv6 ``Udp6RcvbufErrors``) since boot; None when unknown."""
    counters = udp_namespace_counters(proc)
    found = [counters[k] for k in ("RcvbufErrors", "Udp6RcvbufErrors") if k in counters]
    return sum(found) if found else None
