"""What a training checkpoint holds (its meta schema, written and read here) and restoring a
trainer from one. Coordinating saves is `nnxloop.saving`.

The orbax side lives in `nnxloop.checkpointing`; this module knows about the trainer.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Iterable
from typing import Any, Protocol

import jax

from nnxloop.checkpointing import (
    CheckpointError,
    CheckpointStore,
    compare_shapes,
    fingerprint,
    path_shapes,
)
from nnxloop.version import package_version

log = logging.getLogger("nnxloop")


class Checkpointed(Protocol):
    """What this module reads and sets on the fit run it saves or restores (it imports no
    run: the run imports it)."""

    @property
    def step(self) -> int: ...

    @property
    def epoch(self) -> int: ...

    @property
    def position(self) -> int: ...

    @property
    def stop_training(self) -> bool: ...

    @property
    def preempted(self) -> bool: ...

    @property
    def steps_per_dispatch(self) -> int: ...

    @property
    def gradient_accumulation_steps(self) -> int: ...

    @property
    def engine(self) -> Any: ...

    @property
    def callbacks(self) -> Iterable[Any]: ...

    def data_state(self) -> Any: ...

    def before_checkpoint(self) -> None: ...

    def restore_progress(
        self,
        *,
        step: int,
        epoch: int,
        position: int,
        data_state: Any = None,
        stopped: bool = False,
    ) -> None: ...


def _legacy_key(index: int, callback: Any) -> str:
    """The key checkpoints written before `state_key` used: the callback's list position."""
    return f"{index}:{type(callback).__name__}"


def restore_callback_states(callbacks: Any, states: dict[str, Any], where: str) -> None:
    """Gives each callback the state saved under its `state_key` (in checkpoints written
    before keys, under its list position), and warns about saved states no callback claims."""
    unclaimed = set(states)
    for i, cb in enumerate(callbacks):
        for key in (cb.state_key, _legacy_key(i, cb)):
            if key in states:
                cb.load_state_dict(states[key])
                unclaimed.discard(key)
                break
    unclaimed = {k for k in unclaimed if states[k]}  # an empty state restores nothing
    if unclaimed:
        log.warning(
            "%s holds the state of callbacks this run does not have: %s. They are ignored; "
            "if a callback's arguments changed (a directory, a monitored metric), its "
            "state_key changed with them.",
            where,
            ", ".join(sorted(unclaimed)),
        )


_warned_types: set[type] = set()  # iterator states already reported as not JSON


def _encode(data_state: Any) -> Any:
    """The data iterator's state as JSON (grain's loaders give bytes: stored as base64)."""
    if isinstance(data_state, bytes):
        return {"base64": base64.b64encode(data_state).decode("ascii")}
    try:
        json.dumps(data_state)
    except TypeError:
        if type(data_state) in _warned_types:
            return None
        _warned_types.add(type(data_state))
        log.warning(
            "The data iterator's state (%s) is not JSON-serialisable; it is not checkpointed, "
            "and a resume skips to the position by iterating.",
            type(data_state).__name__,
        )
        return None
    return data_state


def _decode(data_state: Any) -> Any:
    if isinstance(data_state, dict) and set(data_state) == {"base64"}:
        return base64.b64decode(data_state["base64"])
    return data_state


def process_data(trainer: Checkpointed) -> dict[str, Any] | None:
    """With several processes, this process's own data-iterator state, for the checkpoint's
    `data` item (a file per process); None in a single process (it goes in `meta`)."""
    if jax.process_count() == 1:
        return None
    return {"data_state": _encode(trainer.data_state())}


def training_meta(trainer: Checkpointed) -> dict[str, Any]:
    """The JSON item of a training checkpoint for the trainer's current state."""
    engine = trainer.engine
    shapes = path_shapes(engine.state()[0])
    # Each process has its own iterator but orbax writes the JSON item from process 0 only:
    # with several processes each one's state goes in the `data` item (`process_data`).
    data_state = _encode(trainer.data_state()) if jax.process_count() == 1 else None
    return {
        "step": trainer.step,
        "epoch": trainer.epoch,
        "position": trainer.position,
        # A run a callback ended (early stopping, TerminateOnNaN, any `stop_training`) is
        # over: a rerun that restores this checkpoint trains no further. A preemption is not.
        "stopped": bool(trainer.stop_training and not trainer.preempted),
        "data_state": data_state,
        "callbacks": {cb.state_key: cb.state_dict() for cb in trainer.callbacks},
        "fingerprint": fingerprint(path_shapes(engine.state())),
        "model_shapes": shapes,
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "steps_per_dispatch": trainer.steps_per_dispatch,
        "gradient_accumulation_steps": trainer.gradient_accumulation_steps,
        "time": time.time(),
        "nnxloop_version": package_version(),
    }


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else "(no message)"


def _check_accumulation(meta: dict[str, Any], trainer: Checkpointed, where: str) -> None:
    """Refuses to resume with another `gradient_accumulation_steps`: the checkpoint's place in
    its epoch counts updates of the saved number of batches."""
    saved = meta.get("gradient_accumulation_steps", 1)
    if saved != trainer.gradient_accumulation_steps:
        raise CheckpointError(
            f"{where} was trained with gradient_accumulation_steps={saved}, this trainer has "
            f"{trainer.gradient_accumulation_steps}: its place in the data counts updates of "
            f"{saved} batches, so resuming with another number would train on other batches. "
            f"Resume with gradient_accumulation_steps={saved}, or start a new run in another "
            "directory (nl.load_model loads its weights)."
        )


def _restored_data_state(meta: dict[str, Any], store: CheckpointStore, step: int) -> Any:
    """This process's data-iterator state saved at `step`: from `meta` in a single process,
    from the process's own file of the `data` item with several. A checkpoint written by
    another number of processes has none for this run's processes (its batches were shared
    out otherwise): each skips to the saved position by iterating, which the warning says."""
    written_by, here = int(meta.get("process_count", 1)), jax.process_count()
    if written_by != here:
        if meta.get("position"):
            log.warning(
                "The checkpoint of step %d in %s was written by %d process(es) and this run "
                "has %d: their data iterators' states do not match this run's processes, so "
                "each process gets back to its place in the epoch by iterating over the %d "
                "batches it had consumed (replay).",
                step,
                store.directory,
                written_by,
                here,
                meta["position"],
            )
        return None
    if here == 1:
        return _decode(meta.get("data_state"))
    saved = store.read_process_data(step)
    return _decode(saved.get("data_state")) if saved is not None else None


def restore_training(trainer: Checkpointed, store: CheckpointStore) -> int | None:
    """Restores the newest readable checkpoint of `store` into `trainer`; returns its step.

    A checkpoint that fails to read is renamed aside with a warning naming its step, and the
    next older one is tried, so a damaged newest checkpoint never blocks a restart.
    """
    engine = trainer.engine
    abstract = engine.abstract_state()
    model_shapes = path_shapes(abstract[0])
    expected = fingerprint(path_shapes(abstract))
    set_aside: list[str] = []
    for step in reversed(store.steps()):
        try:
            meta = store.read_meta(step)
            if meta.get("step") != step:
                raise ValueError(
                    f"its meta says step {meta.get('step')!r}, its directory says {step}"
                )
            if meta.get("fingerprint") != expected:
                where = f"The checkpoint at step {step} in {store.directory}"
                compare_shapes(meta.get("model_shapes", {}), model_shapes, where=where)
                raise CheckpointError(
                    f"{where} holds an optimizer state of another structure; resume with the "
                    "optimizer it was written with, or start in a new directory."
                )
            _check_accumulation(
                meta, trainer, f"The checkpoint at step {step} in {store.directory}"
            )
            model_state, opt_state = store.restore(step, abstract[0], abstract[1])
        except (CheckpointError, MemoryError):
            raise  # not damage: moving the checkpoint aside would not help
        except Exception as exc:  # orbax raises many types for damaged files
            moved = store.quarantine(step)
            set_aside.append(moved)
            log.warning(
                "Checkpoint step %d in %s is unreadable (%s: %s); moved it to %s and trying "
                "the previous one.",
                step,
                store.directory,
                type(exc).__name__,
                first_line(exc),
                moved,
            )
            continue
        engine.set_leaves(jax.tree.leaves(model_state) + jax.tree.leaves(opt_state))
        trainer.restore_progress(
            step=meta["step"],
            epoch=meta["epoch"],
            position=meta["position"],
            data_state=_restored_data_state(meta, store, step),
            stopped=bool(meta.get("stopped", False)),
        )
        restore_callback_states(
            trainer.callbacks,
            meta.get("callbacks", {}),
            f"The checkpoint of step {step} in {store.directory}",
        )
        return step
    set_aside += store.set_aside()
    if set_aside:
        raise CheckpointError(
            f"No checkpoint in {store.directory} can be read; these were set aside as unreadable: "
            f"{sorted(set(set_aside))}. Training does not silently start over: to start over, "
            "delete them (or use a new directory); to recover, inspect them with "
            "`nnxloop inspect`."
        )
    return None
