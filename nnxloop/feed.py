"""Where the batches of a `fit` come from, cut into dispatches.

`IteratorFeed` pulls batches from a fresh iterator over `train_data` each epoch and passes them
into the jitted call (stacked for a K-step scan). `StagedFeed` is for a list or tuple of
same-shaped batches: it copies them to the device once per `fit` call, and a K-step dispatch
then passes only the index of its first batch (with K = 1, each step is handed its batch
already on the device), so steps cost no host-side stacking, checking or copying. Both cut
an epoch into the same dispatches, so a run gives the same parameters whichever feeds it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from nnxloop import data as data_lib

log = logging.getLogger("nnxloop")

# `stage_data=None` stages a list or tuple of batches up to this size (and never more than a
# sixteenth of an accelerator's memory): e.g. a 60k-example float32 MNIST is 188 MB.
STAGE_AUTO_BYTES = 256 * 2**20


@dataclasses.dataclass
class Dispatch:
    """One jitted call of the engine: `run(engine, acc) -> (acc, metrics)` over `len(sizes)`
    steps (the metrics stacked when `stacked`). `sample` is a batch, or its shapes, as the
    steps see it."""

    run: Callable[[Any, Any], tuple[Any, Any]]
    sizes: list[int]
    stacked: bool
    sample: Any


def _dtype(x: Any) -> np.dtype:
    dtype = getattr(x, "dtype", None)
    return np.dtype(dtype) if dtype is not None else np.result_type(x)


def _layout(batch: Any) -> tuple[Any, list[tuple[tuple[int, ...], np.dtype]]]:
    return jax.tree.structure(batch), [(np.shape(x), _dtype(x)) for x in jax.tree.leaves(batch)]


def _same_shapes(batches: list[Any]) -> bool:
    first = _layout(batches[0])
    return all(_layout(b) == first for b in batches[1:])


def host_dispatches(
    batches: list[Any], k: int, mesh: Mesh, *, grouped: bool = False
) -> list[Dispatch]:
    """Dispatches for batches pulled on the host: one K-step scan when there are exactly K
    (K > 1) alike batches, else one single step per batch. `grouped`: each batch is the
    stacked micro-batches of one accumulated update."""
    sizes = [data_lib.batch_size(b, mesh, grouped=grouped) for b in batches]
    if len(batches) == k > 1 and _same_shapes(batches):

        def run_stacked(engine, acc):
            stacked = data_lib.stack(batches)
            stacked = data_lib.prepare(stacked, mesh, stacked=True, grouped=grouped)
            return engine.train(acc, stacked, stacked=True)

        return [Dispatch(run_stacked, sizes, True, batches[0])]

    def single(batch):
        def run(engine, acc):
            return engine.train(acc, data_lib.prepare(batch, mesh, grouped=grouped), stacked=False)

        return run

    return [Dispatch(single(b), [s], False, b) for b, s in zip(batches, sizes)]


class Remainder:
    """Warns once per `fit` that batches at an epoch's end were left out of every update."""

    def __init__(self, groups: int):
        self.groups = groups
        self.warned = False

    def __call__(self, left: int) -> None:
        if not self.warned:
            self.warned = True
            log.warning(
                "An epoch ended with %d batch%s, too few for an update of "
                "gradient_accumulation_steps=%d: %s left out (in every epoch that ends so). "
                "Use a number of batches per epoch that divides by %d to train on all of them.",
                left,
                "" if left == 1 else "es",
                self.groups,
                "it is" if left == 1 else "they are",
                self.groups,
            )


def group(batches: list[Any]) -> Any:
    """The micro-batches of one accumulated update, stacked on a new leading axis.

    Raises:
        ValueError: they differ in structure, shapes or dtypes (says how to fix it).
    """
    if not _same_shapes(batches):
        raise ValueError(
            "The batches of one accumulated update differ in structure, shape or dtype (with "
            f"gradient_accumulation_steps={len(batches)}, each update stacks that many "
            "consecutive batches): give every batch the same shape, e.g. drop the last partial "
            "batch (grain's .batch(n, drop_remainder=True))."
        )
    return data_lib.stack(batches)


class GroupedIterator:
    """Consecutive groups of `remainder.groups` batches of `iterator`, each stacked by
    `group`: the batches of one update with that `gradient_accumulation_steps`. Ends when
    fewer are left (reported to `remainder`). Has `get_state` / `set_state` when `iterator`
    has them: taken between groups, the inner state is on a group boundary."""

    def __init__(self, iterator: Any, remainder: Remainder):
        self.inner = iterator
        self.remainder = remainder
        for name in ("get_state", "set_state"):
            method = getattr(iterator, name, None)
            if callable(method):
                setattr(self, name, method)

    def __iter__(self) -> GroupedIterator:
        return self

    def __next__(self) -> Any:
        batches = []
        for _ in range(self.remainder.groups):
            try:
                batches.append(next(self.inner))
            except StopIteration:
                if batches:
                    self.remainder(len(batches))
                raise
        return group(batches)


def _describe(iterator: Any) -> str:
    """`iterator`'s type for a message (the user's, inside a grouping iterator)."""
    inner = iterator.inner if isinstance(iterator, GroupedIterator) else iterator
    return f"{type(inner).__name__} iterator"


class IteratorFeed:
    """Pulls each epoch's batches from a new iterator over `train_data`, only as they are used,
    so the iterator's position (and its checkpointed state) always matches the steps done."""

    def __init__(self, train_data: Iterable[Any], mesh: Mesh, remainder: Remainder):
        self.data = train_data
        self._mesh = mesh
        groups = remainder.groups
        self._remainder = remainder
        self.iterator: Any = None
        length = _length(train_data)
        self.length = length // groups if length is not None else None
        if length is not None and length % groups:
            # The loop ends such an epoch after its last whole update, so the batches after
            # it are never pulled (and the grouping iterator never sees them): said here.
            remainder(length % groups)

    def changed(self) -> bool:
        return False  # a new iterator each epoch sees the data as it is then

    def open(self, position: int, data_state: Any, resumed: bool, epoch: int) -> None:
        self.iterator = iter(self.data)
        if self._remainder.groups > 1:
            self.iterator = GroupedIterator(self.iterator, self._remainder)
        if not position:
            return
        set_state = getattr(self.iterator, "set_state", None)
        if data_state is not None and callable(set_state):
            set_state(data_state)
            return
        skipped = data_lib.skip(self.iterator, position) * self._remainder.groups
        # Worth a warning after a restore; a second fit call mid-epoch is routine.
        (log.warning if resumed else log.info)(
            "Resuming at batch %d of epoch %d: skipped %d batches by iterating over the %s "
            "(no saved state to restore it from; give train_data a get_state/set_state "
            "iterator, e.g. grain's, to resume in O(1)).",
            position * self._remainder.groups,
            epoch,
            skipped,
            _describe(self.iterator),
        )

    def take(self, n: int, k: int) -> list[Dispatch]:
        batches = []
        for _ in range(n):
            try:
                batches.append(next(self.iterator))
            except StopIteration:
                break
        grouped = self._remainder.groups > 1
        return host_dispatches(batches, k, self._mesh, grouped=grouped) if batches else []


class StagedFeed:
    """A list or tuple of batches held on the device, for a `fit` with `steps_per_dispatch=K`.

    With K > 1, the batches are one array per leaf, `[N, batch, ...]` (sharded along `data`
    on axis 1), which a K-step scan indexes; single steps (shortened dispatches, epoch ends)
    take their batch from the list as unstaged ones do: on XLA's CPU backend a lone step that
    indexes the staged arrays measured ~1.3x slower than one handed its batch, whereas inside
    a scan indexing costs no more than the scan's own slicing. With K = 1, each batch is
    copied to the device on its own and handed to its step as it is.

    The leading run of alike batches is staged; any batches after it (a smaller last batch)
    are passed from the host as usual. Built by `stage`.
    """

    def __init__(self, train_data: Any, count: int, k: int, mesh: Mesh, remainder: Remainder):
        self.data = train_data
        self._originals = list(train_data)
        batches = self._originals
        self._grouped = remainder.groups > 1
        if self._grouped:
            batches = _groups_of(batches, remainder)
            count //= remainder.groups
        self._count = count
        self._size = data_lib.batch_size(batches[0], mesh, grouped=self._grouped)
        self._mesh = mesh
        self._cursor = 0
        self.iterator = None  # no iterator state: the position alone says where an epoch is
        self._batches = batches
        self.length: int | None = len(batches)
        self._arrays = None
        if k > 1:
            stacked = data_lib.stack(batches[:count])  # a new array: the batches are read now
            sharding = data_lib.batch_sharding(mesh, stacked=True, grouped=self._grouped)
            self._arrays = jax.device_put(stacked, sharding)
            self._sample = jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), self._arrays
            )
        else:
            sharding = data_lib.batch_sharding(mesh, grouped=self._grouped)
            self._batches = [
                jax.device_put(jax.tree.map(_own, b), sharding) if i < count else b
                for i, b in enumerate(batches)
            ]

    def changed(self) -> bool:
        """Whether the list now holds other batches than when staged (replaced, reordered,
        added or removed: e.g. shuffled in `on_epoch_begin`); checked at each epoch start."""
        data = self.data
        return len(data) != len(self._originals) or any(
            a is not b for a, b in zip(data, self._originals)
        )

    def open(self, position: int, data_state: Any, resumed: bool, epoch: int) -> None:
        self._cursor = min(position, len(self._batches))

    def take(self, n: int, k: int) -> list[Dispatch]:
        start = self._cursor
        end = min(start + n, len(self._batches))
        self._cursor = end
        if self._arrays is not None and end - start == k > 1 and end <= self._count:

            def run(engine, acc):
                return engine.train_staged(acc, self._arrays, start, k)

            return [Dispatch(run, [self._size] * k, True, self._sample)]
        if self._arrays is None and end - start == 1 and start < self._count:
            batch = self._batches[start]

            def run_single(engine, acc):
                return engine.train(acc, batch, stacked=False)

            return [Dispatch(run_single, [self._size], False, batch)]
        return host_dispatches(self._batches[start:end], k, self._mesh, grouped=self._grouped)


def _groups_of(batches: list[Any], remainder: Remainder) -> list[Any]:
    """`batches` cut into stacked groups of `remainder.groups` (see `group`); batches left
    over are left out, reported to `remainder`."""
    n = remainder.groups
    whole = len(batches) - len(batches) % n
    if whole < len(batches):
        remainder(len(batches) - whole)
    return [group(batches[i : i + n]) for i in range(0, whole, n)]


def _length(train_data: Any) -> int | None:
    """Batches in an epoch of `train_data`, when it says (a list, a grain `MapDataset`, a
    loader with `__len__`): the loop then knows an epoch is over at its last step. None for
    data that only ends by running out (an iterator, a grain `IterDataset`)."""
    try:
        n = len(train_data)  # type: ignore[arg-type]
    except (TypeError, NotImplementedError):
        return None
    return n if isinstance(n, int) and n > 0 else None


def _own(x: Any) -> Any:
    """A NumPy leaf copied (so that a device array made from it shares no memory with the
    caller's); JAX arrays are immutable and kept."""
    return x if isinstance(x, jax.Array) else np.array(x, copy=True)


def _nbytes(batches: list[Any]) -> int:
    return sum(_dtype(x).itemsize * np.size(x) for x in jax.tree.leaves(batches))


def _auto_limit() -> int:
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # backends without memory statistics
        stats = {}
    limit = stats.get("bytes_limit")
    return min(STAGE_AUTO_BYTES, limit // 16) if limit else STAGE_AUTO_BYTES


def _arrays_only(batch: Any) -> bool:
    return all(isinstance(x, (np.ndarray, jax.Array)) for x in jax.tree.leaves(batch))


def _unstageable(train_data: Any) -> str | None:
    """Why `train_data` cannot be staged, or None."""
    if not isinstance(train_data, (list, tuple)):
        return f"it is a {type(train_data).__name__}, not a list or tuple of batches"
    if jax.process_count() > 1:
        return "each process passes its own share of the batches (multi-process run)"
    if not train_data:
        return "it is empty"
    if not _arrays_only(train_data[0]):
        return "its first batch holds leaves that are not NumPy or JAX arrays"
    return None


def _leading_alike(batches: list[Any]) -> int:
    """How many batches from the start share the first one's structure, shapes and dtypes."""
    first, n = _layout(batches[0]), 1
    while n < len(batches) and _arrays_only(batches[n]) and _layout(batches[n]) == first:
        n += 1
    return n


def stage(
    train_data: Any, mesh: Mesh, mode: bool | None, k: int, remainder: Remainder
) -> StagedFeed | None:
    """A `StagedFeed` for `train_data` when `mode` asks for one (None: when it fits the
    automatic limit), else None.

    Raises:
        ValueError: `mode` is True and `train_data` cannot be staged (says why).
    """
    if mode is False:
        return None
    why = _unstageable(train_data)
    if why is not None:
        if mode:
            raise ValueError(
                f"stage_data=True, but train_data cannot be staged on the device: {why}. Pass "
                "a list or tuple of batches of NumPy or JAX arrays, or leave stage_data=None."
            )
        return None
    batches = list(train_data)
    if mode is None and len(batches) * _nbytes(batches[:1]) > _auto_limit():
        return None  # (before looking at every batch)
    count = _leading_alike(batches)
    if mode is None and count < 2:
        return None
    if count < remainder.groups:
        return None  # not one whole update of alike batches to stage
    return StagedFeed(train_data, count, k, mesh, remainder)


def for_fit(
    train_data: Any, mesh: Mesh, mode: bool | None, k: int, remainder: Remainder | None = None
) -> IteratorFeed | StagedFeed:
    """The feed of one `fit` call with `steps_per_dispatch=k`; with a `remainder` of more
    than one group, each step is one accumulated update of that many batches.

    Raises:
        ValueError: the data has fewer batches than one accumulated update.
    """
    remainder = remainder or Remainder(1)
    length = _length(train_data)
    if length is not None and length < remainder.groups:
        raise ValueError(
            f"train_data has {length} batch{'' if length == 1 else 'es'}, fewer than one update "
            f"of gradient_accumulation_steps={remainder.groups} needs: pass more batches or "
            "accumulate over fewer."
        )
    return stage(train_data, mesh, mode, k, remainder) or IteratorFeed(train_data, mesh, remainder)
