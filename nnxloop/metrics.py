"""Training metrics between the device, where steps accumulate them, and the host."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class TotalsSnapshot:
    """The totals at one moment; `MetricTotals.average_since` averages from it."""

    sums: Mapping[str, float]
    count: float

    def average_since(self, start: TotalsSnapshot) -> dict[str, float]:
        """Per-step averages of the metrics over the steps since `start` ({} if none)."""
        steps = self.count - start.count
        if steps <= 0:
            return {}
        return {k: (v - start.sums.get(k, 0.0)) / steps for k, v in self.sums.items()}


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

    def snapshot(self) -> TotalsSnapshot:
        return TotalsSnapshot(dict(self.sums), self.count)


def _start_copy(acc: Any) -> None:
    for leaf in jax.tree.leaves(acc):
        leaf.copy_to_host_async()


def _is_ready(acc: Any) -> bool:
    return all(leaf.is_ready() for leaf in jax.tree.leaves(acc))


class PendingTotals:
    """The totals as of one step, read from the device only when first needed.

    Taking one costs no device-to-host wait: it holds the host totals of that moment and the
    device accumulators not yet folded into them, whose copies to the host have been started.
    `resolve` waits for those copies; `ready` says whether it would have to.
    """

    def __init__(self, base: TotalsSnapshot, accumulators: tuple[Any, ...]):
        self._base = base
        self._accumulators = accumulators  # their copies to the host are already started
        self._resolved: TotalsSnapshot | None = None if accumulators else base

    def ready(self) -> bool:
        # Dispatches complete in order: the newest accumulator is the last to be ready.
        return self._resolved is not None or _is_ready(self._accumulators[-1])

    def resolve(self) -> TotalsSnapshot:
        if self._resolved is None:
            totals = MetricTotals()
            totals.add(self._base.sums, self._base.count)
            for sums, count in jax.device_get(self._accumulators):
                totals.add(sums, count)
            self._resolved = totals.snapshot()
            self._accumulators = ()
        return self._resolved

    def average_since(self, start: PendingTotals) -> dict[str, float]:
        """Per-step averages over the steps between `start` and this ({} if none)."""
        return self.resolve().average_since(start.resolve())


class Accumulation:
    """The training metrics of a run: float32 sums on the device, float64 totals on the host.

    Each train step adds its metrics into the device accumulator (`acc`, replaced by every
    dispatch; never donated, so an old one stays readable). `retire` (at epoch ends and
    every `FOLD_EVERY` steps, the same steps on every process) starts a fresh accumulator and
    queues the old one for the host, which folds it in once its copy has arrived, without
    waiting. So the dispatch queue is never drained just to keep metrics, and float32 sums
    never run over more than `FOLD_EVERY` steps.
    """

    def __init__(self) -> None:
        self.totals = MetricTotals()
        self.acc: Any = None  # the current device accumulator
        self.zero: Any = None  # a zero accumulator of the same structure (reused)
        self.dirty = False  # acc holds steps
        self._retired: list[Any] = []

    def start(self, zero: Any) -> None:
        if self.acc is None:
            self.acc = self.zero = zero

    def advance(self, acc: Any) -> None:
        self.acc, self.dirty = acc, True

    def retire(self) -> None:
        if self.dirty:
            _start_copy(self.acc)
            self._retired.append(self.acc)
            self.acc, self.dirty = self.zero, False
        while self._retired and _is_ready(self._retired[0]):
            sums, count = jax.device_get(self._retired.pop(0))
            self.totals.add(sums, count)

    def pending(self) -> PendingTotals:
        """The totals up to now, read lazily (see `PendingTotals`)."""
        if not self.dirty:
            return PendingTotals(self.totals.snapshot(), tuple(self._retired))
        _start_copy(self.acc)
        return PendingTotals(self.totals.snapshot(), (*self._retired, self.acc))


class LazyLogs(MutableMapping):
    """A dict of metrics computed on first read (e.g. an epoch's averages, which need a
    device read); entries set before that are kept and win over computed ones."""

    def __init__(self, compute: Callable[[], Mapping[str, Any]]):
        self._compute: Callable[[], Mapping[str, Any]] | None = compute
        self._data: dict[str, Any] = {}

    def _load(self) -> dict[str, Any]:
        if self._compute is not None:
            compute, self._compute = self._compute, None
            self._data = {**compute(), **self._data}
        return self._data

    def __getitem__(self, key: str) -> Any:
        return self._load()[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._data[key] = value

    def __delitem__(self, key: str) -> None:
        del self._load()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())

    def __repr__(self) -> str:
        return repr(self._load())

    def copy(self) -> dict[str, Any]:
        """A plain dict of the values (reads them)."""
        return dict(self._load())
