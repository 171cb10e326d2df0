"""Latency of one upstream: EWMA, recent percentiles and a cumulative histogram (seconds)."""

from __future__ import annotations

from array import array
from bisect import bisect_left

#: Histogram bucket upper bounds in seconds (Prometheus-style, last bucket is +Inf).
BUCKETS: tuple[float, ...] = (
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)
_WINDOW = 512
_ALPHA = 0.2


class LatencyTracker:
    """Records answer latencies. ``ewma`` is None until the first sample.

    Percentiles come from the last 512 samples; the histogram counts every sample ever seen.
    """

    __slots__ = ("ewma", "_ring", "_n", "buckets", "count", "total")

    def __init__(self) -> None:
        self.ewma: float | None = None
        self._ring = array("d", bytes(8 * _WINDOW))
        self._n = 0
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.count = 0
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.ewma = seconds if self.ewma is None else self.ewma + _ALPHA * (seconds - self.ewma)
        self._ring[self._n % _WINDOW] = seconds
        self._n += 1
        self.buckets[bisect_left(BUCKETS, seconds)] += 1
        self.count += 1
        self.total += seconds

    def penalize(self, seconds: float) -> None:
        """Fold a timeout into the EWMA only, so a silent server ranks as slow (not in the
        percentiles or histogram, which describe answers)."""
        self.ewma = seconds if self.ewma is None else self.ewma + _ALPHA * (seconds - self.ewma)

    def percentile(self, q: float) -> float | None:
        """The q-quantile (0..1) of recent samples, or None without samples."""
        n = min(self._n, _WINDOW)
        if n == 0:
            return None
        data = sorted(self._ring[:n])
        idx = min(n - 1, max(0, int(round(q * (n - 1)))))
        return data[idx]
