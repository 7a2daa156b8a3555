"""The orbax items of a checkpoint, and the guard that never commits a non-finite state.

Checking a ~1 GB state for NaN/inf reads all of it (~0.2 s on a 2-core CPU), longer than
orbax needs to start an async save. So the check is not done before the save: it is
dispatched to the device, orbax starts writing, and one commit future per save (the *gate*)
waits for every item's writes and then reads the flag. orbax renames the step's temporary
directory into place, and removes old steps, only after all commit futures succeed; a gate
that raises therefore leaves every committed checkpoint as it was, and the caller removes
the temporary directory (all writes into it have finished by then).

The items stay plain orbax: `model` and `optimizer` are PyTree items (zarr arrays in OCDBT,
readable with `StandardRestore`), `meta` is a JSON item. Arrays are written without zstd:
on float weights it saves ~8% of the disk space and costs most of the save time here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from nnxloop.checkpointing.errors import NonFiniteStateError

MODEL, OPTIMIZER, META = "model", "optimizer", "meta"
META_FILE = "metadata"  # the file orbax's JSON handler writes the `meta` item to
# With several processes: each process's data-iterator state, one JSON file per process.
DATA = "data"


def process_file(index: int | None = None, count: int | None = None) -> str:
    """The file of the `data` item that process `index` of `count` (this one) writes."""
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    return f"process_{index}-of-{count}.json"


def finite_flag(tree: Any) -> jax.Array:
    """A device scalar, True when every floating-point leaf of `tree` is finite.

    The reduction is dispatched asynchronously: creating the flag does not wait for it.
    """
    floats = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return _all_finite(floats) if floats else jnp.asarray(True)


@jax.jit
def _all_finite(leaves):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def non_finite_error(exc: BaseException | None) -> NonFiniteStateError | None:
    """`exc` if it is a `NonFiniteStateError`, or the one it was raised *from* (orbax may
    wrap it); an error merely raised while handling one is not a refusal."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, NonFiniteStateError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__
    return None


class _QuietRefusals(logging.Filter):
    """Drops orbax's error reports (with tracebacks) of a save the gate refused: nnxloop
    logs one warning naming the step instead. Every other orbax record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and non_finite_error(record.exc_info[1]))


logging.getLogger("absl").addFilter(_QuietRefusals())


class _Gate:
    """One save's commit gate: an orbax future that completes when all the save's writes
    have, and then fails if the state is not finite."""

    def __init__(self, flag: jax.Array, step: int):
        self.flag = flag
        self.step = step
        self.writes: list[Any] = []

    def result(self, timeout: float | None = None) -> None:
        # Every item's async_save has run (orbax gathers them) before any future is waited on.
        failure = None
        for write in self.writes:
            try:
                write.result(timeout=timeout)
            except Exception as exc:
                failure = failure or exc
        if not bool(self.flag):  # a refusal explains a failed write too (same on every process)
            raise NonFiniteStateError(
                f"Not saving step {self.step}: the model or optimizer state has non-finite values.",
                self.step,
            ) from failure
        if failure is not None:
            raise failure

    def cancel(self) -> bool:
        return all([bool(write.cancel()) for write in self.writes])


class _Gated:
    """Mixin for an orbax handler: its writes go through the save's gate."""

    async def async_save(self, directory, item=None, save_args=None, args=None):
        writes = await super().async_save(directory, args=args)
        args.gate.writes.extend(writes or [])
        return [args.gate]


class _ArraysHandler(_Gated, ocp.PyTreeCheckpointHandler):
    """orbax's PyTree handler, zstd off, writes gated."""

    def __init__(self):
        super().__init__(use_compression=False)


class _MetaHandler(_Gated, ocp.JsonCheckpointHandler):
    """orbax's JSON handler, write gated."""


class _ProcessDataHandler(_Gated, ocp.JsonCheckpointHandler):
    """orbax's JSON handler, but every process writes (and reads) a file of its own,
    `process_<index>-of-<count>.json`: each has its own data iterator. Write gated."""

    def __init__(self):
        super().__init__(filename=process_file())

    async def _save_fn(self, x, directory):
        (directory / self._filename).write_text(json.dumps(x))


@ocp.args.register_with_handler(_ArraysHandler, for_save=True)
@dataclasses.dataclass
class _ArraysSave(ocp.args.PyTreeSave):
    gate: _Gate | None = None


@ocp.args.register_with_handler(_ArraysHandler, for_restore=True)
@dataclasses.dataclass
class _ArraysRestore(ocp.args.PyTreeRestore):
    pass


@ocp.args.register_with_handler(_MetaHandler, for_save=True)
@dataclasses.dataclass
class _MetaSave(ocp.args.JsonSave):
    gate: _Gate | None = None


@ocp.args.register_with_handler(_MetaHandler, for_restore=True)
@dataclasses.dataclass
class MetaRestore(ocp.args.JsonRestore):
    """Reads the `meta` item through a store's manager."""


@ocp.args.register_with_handler(_ProcessDataHandler, for_save=True)
@dataclasses.dataclass
class _ProcessDataSave(ocp.args.JsonSave):
    gate: _Gate | None = None


@ocp.args.register_with_handler(_ProcessDataHandler, for_restore=True)
@dataclasses.dataclass
class ProcessDataRestore(ocp.args.JsonRestore):
    """Reads this process's file of the `data` item through a store's manager."""


def item_handlers() -> dict[str, ocp.CheckpointHandler]:
    """The handlers of a store's `CheckpointManager` (new ones per manager)."""
    return {
        MODEL: _ArraysHandler(),
        OPTIMIZER: _ArraysHandler(),
        META: _MetaHandler(filename=META_FILE),
        DATA: _ProcessDataHandler(),
    }


def guarded_save_args(
    state: tuple[Any, Any], meta: dict[str, Any], step: int, process_data: Any = None
):
    """orbax save arguments for `(model, optimizer)` state and meta, gated on finiteness;
    with `process_data` (a JSON value per process), the `data` item too."""
    gate = _Gate(finite_flag(state), step)
    items = {
        MODEL: _ArraysSave(state[0], gate=gate),
        OPTIMIZER: _ArraysSave(state[1], gate=gate),
        META: _MetaSave(meta, gate=gate),
    }
    if process_data is not None:
        items[DATA] = _ProcessDataSave(process_data, gate=gate)
    return ocp.args.Composite(**items)


def arrays_restore_args(abstract: Any) -> _ArraysRestore:
    """Restores into the shapes, dtypes and shardings of `abstract` (ShapeDtypeStruct leaves)."""
    return _ArraysRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)
    )
