"""Hand a listening address over from an old sidecar process to a new one without a lost query.

With ``--reuse-port`` both processes bind the same address (``SO_REUSEPORT``), and the kernel
spreads datagrams and connections over the sockets of the group by a hash of the client's
address and port. A socket's queue dies with it: whatever the hash put in the old process's
queue after its last read is lost when it closes. So the newest process steers every new
datagram and connection to its own socket with a one-instruction classic BPF program on the
group (``SO_ATTACH_REUSEPORT_CBPF``: "return index 1"), and the old process, which then
receives nothing new, answers what it holds, drains and exits.

Index 1 is the second socket that joined the group: the new process's, beside the old
process's one socket per address. When the old socket leaves, the kernel moves the last
socket into its slot, index 1 no longer exists, and the kernel falls back to its hash over
the one socket left, so a lone sidecar is unaffected and the next replacement attaches its
own program the same way.
"""

from __future__ import annotations

import ctypes
import logging
import socket
import struct
import sys
from typing import Protocol

log = logging.getLogger("sidecar.listen")

#: linux/socket.h (asm-generic): SO_ATTACH_REUSEPORT_CBPF.
SO_ATTACH_REUSEPORT_CBPF = 51
#: BPF_RET | BPF_K: return the constant k.
_BPF_RET_K = 0x06
#: The reuseport group index of the newest of two sockets.
NEWEST = 1


class _Settable(Protocol):
    def setsockopt(self, level: int, optname: int, value: bytes, /) -> None: ...


def steer_to(sock: _Settable, index: int = NEWEST) -> bool:
    """Attach "return ``index``" to ``sock``'s reuseport group. False (and one log line)
    where the kernel or platform cannot: the handover then still works, but datagrams the
    hash sends to the old process in its last moments can be lost."""
    if not sys.platform.startswith("linux"):
        log.warning("reuse-port: traffic steering needs Linux; handover may drop queued queries")
        return False
    insn = (ctypes.c_uint8 * 8).from_buffer_copy(struct.pack("=HBBI", _BPF_RET_K, 0, 0, index))
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }, native layout.
    prog = struct.pack("@HP", 1, ctypes.addressof(insn))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, prog)
    except OSError as exc:
        log.warning("reuse-port: cannot steer new traffic to this process (%s); handover may "
                    "drop queued queries", exc.strerror or exc)
        return False
    return True
