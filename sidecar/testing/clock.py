"""A clock for tests: real monotonic time plus an offset the test moves forward.

Inject it where a component takes a ``clock`` (``Cache(..., clock=OffsetClock())``) to age
entries without waiting. The offset only adds to real time, so the clock keeps running: a
sidecar under test still talks to upstreams through c-ares, whose timers follow real time.
"""

from __future__ import annotations

import time


class OffsetClock:
    """``clock()``: ``time.monotonic()`` plus :attr:`offset` seconds.

    :meth:`advance` moves it forward; it never goes back, as the monotonic clock it stands
    in for.
    """

    __slots__ = ("offset",)

    def __init__(self, offset: float = 0.0) -> None:
        #: Seconds added to ``time.monotonic()``.
        self.offset = offset

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        """Jump ``seconds`` (>= 0) ahead: what was stored ages by that much at once."""
        if seconds < 0:
            raise ValueError("a monotonic clock does not go back")
        self.offset += seconds
