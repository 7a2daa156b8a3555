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

from nnxloop._data import batches as data_lib

log = logging.getLogger("nnxloop")


@dataclasses.dataclass
class Dispatch:
    """One jitted call of the engine: `run(engine, acc) -> (acc, metrics)` over `len(sizes)`
    steps (the metrics stacked when `stacked`). `sample` is a batch, or its shapes, as the
    steps see it."""

    run: Callable[[Any, Any], tuple[Any, Any]]
    sizes: list[int]
    stacked: bool
    sample: Any


def dtype_of(x: Any) -> np.dtype:
    dtype = getattr(x, "dtype", None)
    return np.dtype(dtype) if dtype is not None else np.result_type(x)


def layout(batch: Any) -> tuple[Any, list[tuple[tuple[int, ...], np.dtype]]]:
    return jax.tree.structure(batch), [(np.shape(x), dtype_of(x)) for x in jax.tree.leaves(batch)]


def same_shapes(batches: list[Any]) -> bool:
    first = layout(batches[0])
    return all(layout(b) == first for b in batches[1:])


def host_dispatches(
    batches: list[Any], k: int, mesh: Mesh, *, grouped: bool = False
) -> list[Dispatch]:
    """Dispatches for batches pulled on the host: one K-step scan when there are exactly K
    (K > 1) alike batches, else one single step per batch. `grouped`: each batch is the
    stacked micro-batches of one accumulated update."""
    sizes = [data_lib.batch_size(b, mesh, grouped=grouped) for b in batches]
    if len(batches) == k > 1 and same_shapes(batches):

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
    if not same_shapes(batches):
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
        length = length_of(train_data)
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


def length_of(train_data: Any) -> int | None:
    """Batches in an epoch of `train_data`, when it says (a list, a grain `MapDataset`, a
    loader with `__len__`): the loop then knows an epoch is over at its last step. None for
    data that only ends by running out (an iterator, a grain `IterDataset`)."""
    try:
        n = len(train_data)  # type: ignore[arg-type]
    except (TypeError, NotImplementedError):
        return None
    return n if isinstance(n, int) and n > 0 else None
