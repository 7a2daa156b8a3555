"""Host-side running totals of the training metrics that the device accumulates."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping


@dataclasses.dataclass(frozen=True)
class TotalsSnapshot:
    """The totals at one moment; `MetricTotals.average_since` averages from it."""

    sums: Mapping[str, float]
    count: float


class MetricTotals:
    """Float64 sums of per-step training metrics and the number of steps they cover.

    The device accumulates in float32 between reads; each read folds that into these totals,
    so any consumer (epoch averages, a logger's window, the progress bar) averages over its own
    window by differencing two snapshots, without resetting anything another consumer uses.
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0.0

    def add(self, sums: Mapping[str, float], count: float) -> None:
        for name, value in sums.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value)
        self.count += float(count)

    def copy(self) -> MetricTotals:
        out = MetricTotals()
        out.add(self.sums, self.count)
        return out

    def snapshot(self) -> TotalsSnapshot:
        return TotalsSnapshot(dict(self.sums), self.count)

    def average_since(self, start: TotalsSnapshot) -> dict[str, float]:
        """Per-step averages of the metrics over the steps since `start` ({} if none)."""
        steps = self.count - start.count
        if steps <= 0:
            return {}
        return {k: (v - start.sums.get(k, 0.0)) / steps for k, v in self.sums.items()}
