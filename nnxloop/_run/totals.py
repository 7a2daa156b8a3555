"""Training metrics between the device, where steps accumulate them, and the host."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from typing import Any

import jax
import numpy as np

from nnxloop._step.metric_values import host_value, is_metric_state


def _plus(total: Any, value: Any) -> Any:
    """`total + value` in float64: a number, or a metric state's arrays one by one."""
    if is_metric_state(value):
        value = jax.tree.map(lambda x: np.asarray(x, np.float64), value)
        return value if total is None else jax.tree.map(np.add, total, value)
    return (total or 0.0) + float(value)


@dataclasses.dataclass(frozen=True)
class TotalsSnapshot:
    """The totals at one moment; `MetricTotals.average_since` averages from it."""

    sums: Mapping[str, Any]
    count: float

    def average_since(self, start: TotalsSnapshot) -> dict[str, float]:
        """Per-step averages of the metrics over the steps since `start` ({} if none); a
        metric state's value computed from its states added over those steps."""
        steps = self.count - start.count
        if steps <= 0:
            return {}
        out = {}
        for k, v in self.sums.items():
            before = start.sums.get(k)
            if is_metric_state(v):
                window = v if before is None else jax.tree.map(np.subtract, v, before)
                out[k] = host_value(k, window)
            else:
                out[k] = (v - (before or 0.0)) / steps
        return out


class MetricTotals:
    """Float64 sums of per-step training metrics and the number of steps they cover (a metric
    state's sum is its arrays summed, which is its merge: `StepEngine` checks that it is).

    The device accumulates in float32 between reads; each read folds that into these totals,
    so any consumer (epoch averages, a logger's window, the progress bar) averages over its own
    window by differencing two snapshots, without resetting anything another consumer uses.
    """

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.count = 0.0

    def add(self, sums: Mapping[str, Any], count: float) -> None:
        for name, value in sums.items():
            self.sums[name] = _plus(self.sums.get(name), value)
        self.count += float(count)

    def snapshot(self) -> TotalsSnapshot:
        return TotalsSnapshot(dict(self.sums), self.count)


class _Sums:
    """One device accumulator on its way to the host: its copy is started when it is made,
    and it is read (once, however many `PendingTotals` hold it) by `_read`."""

    __slots__ = ("device", "host")

    def __init__(self, acc: Any):
        for leaf in jax.tree.leaves(acc):
            leaf.copy_to_host_async()
        self.device = acc
        self.host: tuple[Mapping[str, Any], Any] | None = None

    def ready(self) -> bool:
        if self.host is not None:
            return True
        return all(leaf.is_ready() for leaf in jax.tree.leaves(self.device))


def _read(entries: Iterable[_Sums]) -> None:
    """Reads every entry not read yet, in one `device_get`."""
    missing = [e for e in entries if e.host is None]
    if missing:
        for entry, value in zip(missing, jax.device_get([e.device for e in missing])):
            entry.host, entry.device = value, None


class PendingTotals:
    """The totals as of one step, read from the device only when first needed.

    Taking one costs no device-to-host wait: it holds the host totals of that moment and the
    device accumulators not yet folded into them, whose copies to the host have been started.
    `resolve` waits for those copies; `ready` says whether it would have to.
    """

    def __init__(self, base: TotalsSnapshot, entries: tuple[_Sums, ...]):
        self._base = base
        self._entries = entries
        self._resolved: TotalsSnapshot | None = None if entries else base

    def ready(self) -> bool:
        # Dispatches complete in order: the newest accumulator is the last to be ready.
        return self._resolved is not None or self._entries[-1].ready()

    def resolve(self) -> TotalsSnapshot:
        if self._resolved is None:
            _read(self._entries)
            totals = MetricTotals()
            totals.add(self._base.sums, self._base.count)
            for entry in self._entries:
                totals.add(*entry.host)
            self._resolved = totals.snapshot()
            self._entries = ()
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
    waiting. So the dispatch queue is never drained just to keep metrics, float32 sums never
    run over more than `FOLD_EVERY` steps, and each accumulator is read from the device once,
    however many pending totals (epoch averages, logger windows) include it.
    """

    def __init__(self) -> None:
        self.totals = MetricTotals()
        self.acc: Any = None  # the current device accumulator
        self.zero: Any = None  # a zero accumulator of the same structure (reused)
        self.dirty = False  # acc holds steps
        self._retired: list[_Sums] = []
        self._current: _Sums | None = None  # acc, as a pending read (while it is unchanged)

    def start(self, zero: Any) -> None:
        if self.acc is None:
            self.acc = self.zero = zero

    def advance(self, acc: Any) -> None:
        self.acc, self.dirty, self._current = acc, True, None

    def retire(self) -> None:
        if self.dirty:
            self._retired.append(self._current or _Sums(self.acc))
            self.acc, self.dirty, self._current = self.zero, False, None
        ready = 0
        while ready < len(self._retired) and self._retired[ready].ready():
            ready += 1
        if ready:
            folded, self._retired = self._retired[:ready], self._retired[ready:]
            _read(folded)
            for entry in folded:
                self.totals.add(*entry.host)

    def pending(self) -> PendingTotals:
        """The totals up to now, read lazily (see `PendingTotals`)."""
        if not self.dirty:
            return PendingTotals(self.totals.snapshot(), tuple(self._retired))
        if self._current is None:
            self._current = _Sums(self.acc)
        return PendingTotals(self.totals.snapshot(), (*self._retired, self._current))


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
