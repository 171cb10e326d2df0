"""Every exception the sidecar raises on purpose."""

from __future__ import annotations


class SidecarError(Exception):
    """Base class of the sidecar's own errors."""


class ConfigError(SidecarError, ValueError):
    """A flag or setting has a bad value. The message names it in one line."""


class StartupError(SidecarError):
    """The sidecar cannot start (port in use, no upstream known)."""


class WireError(SidecarError, ValueError):
    """A DNS message cannot be parsed."""


class UpstreamError(SidecarError):
    """One upstream try failed.

    ``kind`` is one of ``timeout``, ``servfail``, ``refused``, ``unreachable`` or ``error``.
    """

    def __init__(self, kind: str, message: str = "", server: str = "") -> None:
        super().__init__(f"{server} {kind}: {message}".strip())
        self.kind = kind
        self.server = server


class ResolveFailed(SidecarError):
    """No upstream of the pool produced an answer within the budget."""

    def __init__(self, kind: str, tried: int) -> None:
        super().__init__(f"upstreams failed ({kind}) after {tried} tries")
        self.kind = kind
        self.tried = tried
