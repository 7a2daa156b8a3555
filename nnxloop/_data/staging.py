"""Staging: a list or tuple of same-shaped batches copied to the device once per `fit`
(`StagedFeed`), and the choice between it and an `IteratorFeed` (`for_fit`)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from nnxloop._data import batches as data_lib
from nnxloop._data.feed import (
    Dispatch,
    IteratorFeed,
    Remainder,
    dtype_of,
    group,
    host_dispatches,
    layout,
    length_of,
)

# `stage_data=None` stages a list or tuple of batches up to this size (and never more than a
# sixteenth of an accelerator's memory): e.g. a 60k-example float32 MNIST is 188 MB.
STAGE_AUTO_BYTES = 256 * 2**20


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


def _own(x: Any) -> Any:
    """A NumPy leaf copied (so that a device array made from it shares no memory with the
    caller's); JAX arrays are immutable and kept."""
    return x if isinstance(x, jax.Array) else np.array(x, copy=True)


def _nbytes(batches: list[Any]) -> int:
    return sum(dtype_of(x).itemsize * np.size(x) for x in jax.tree.leaves(batches))


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
    first, n = layout(batches[0]), 1
    while n < len(batches) and _arrays_only(batches[n]) and layout(batches[n]) == first:
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
    length = length_of(train_data)
    if length is not None and length < remainder.groups:
        raise ValueError(
            f"train_data has {length} batch{'' if length == 1 else 'es'}, fewer than one update "
            f"of gradient_accumulation_steps={remainder.groups} needs: pass more batches or "
            "accumulate over fewer."
        )
    return stage(train_data, mesh, mode, k, remainder) or IteratorFeed(train_data, mesh, remainder)
