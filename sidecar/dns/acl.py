"""Who may query: client addresses checked against ``--allow`` networks.

Parsing an address and testing networks costs microseconds, so each client's verdict is
remembered in a plain dict (bounded; cleared when full) and the hot path pays one lookup.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

_MAX_REMEMBERED = 65536


class Acl:
    """``cache.get(host)`` gives a remembered verdict; ``check(host)`` computes and stores it."""

    def __init__(self, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> None:
        self.networks = tuple(networks)
        self.cache: dict[str, bool] = {}

    def check(self, host: str) -> bool:
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        ok = not self.networks or any(ip in net for net in self.networks)
        if len(self.cache) >= _MAX_REMEMBERED:
            self.cache.clear()
        self.cache[host] = ok
        return ok

    @property
    def loopback_only(self) -> bool:
        return all(net.is_loopback for net in self.networks)
