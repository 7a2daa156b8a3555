"""What a training checkpoint holds, restoring a trainer from one, and coordinating saves.

The orbax side lives in `nnxloop.checkpointing`; this module knows about the trainer.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import dataclasses
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import jax

from nnxloop.checkpointing import (
    CheckpointError,
    CheckpointStore,
    NonFiniteStateError,
    compare_shapes,
    fingerprint,
    path_shapes,
)
from nnxloop.version import package_version

log = logging.getLogger("nnxloop")


class Checkpointed(Protocol):
    """What this module reads and sets on the trainer it saves or restores (it imports no
    trainer: the trainer imports it)."""

    step: int
    epoch: int
    position: int
    stop_training: bool
    preempted: bool
    steps_per_dispatch: int

    @property
    def engine(self) -> Any: ...

    @property
    def callbacks(self) -> Iterable[Any]: ...

    def data_state(self) -> Any: ...

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


def training_meta(trainer: Checkpointed) -> dict[str, Any]:
    """The JSON item of a training checkpoint for the trainer's current state."""
    engine = trainer.engine
    shapes = path_shapes(engine.state()[0])
    # Each process has its own iterator but orbax writes the JSON item from process 0 only,
    # so with several processes a resume skips to the position instead.
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
        "steps_per_dispatch": trainer.steps_per_dispatch,
        "time": time.time(),
        "nnxloop_version": _version(),
    }


@contextlib.contextmanager
def _interrupts_after() -> Iterator[None]:
    """Holds a SIGINT (Ctrl-C) that arrives inside the block and raises its
    `KeyboardInterrupt` when the block is done. Only the main thread receives signals, and
    only there can a handler be set; elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        log.warning("Ctrl-C came during a checkpoint save; the save was finished first.")
        raise KeyboardInterrupt


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else "(no message)"


def _version() -> str:
    return package_version()


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
                _first_line(exc),
                moved,
            )
            continue
        engine.set_leaves(jax.tree.leaves(model_state) + jax.tree.leaves(opt_state))
        trainer.restore_progress(
            step=meta["step"],
            epoch=meta["epoch"],
            position=meta["position"],
            data_state=_decode(meta.get("data_state")),
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


class SaveCoordinator:
    """Every checkpoint save of one trainer goes through here.

    A state with non-finite values is never committed (the store checks it on the device
    while orbax writes, and the caller's `on_refused` runs when that is found). Once
    `AsyncSaveCallback` turns asynchronous saving on, it bounds the saves in flight and
    re-raises a background failure in the training thread, naming the step.
    """

    def __init__(self) -> None:
        self.async_enabled = False
        self.max_in_flight = 1
        self._pending: collections.deque[_Pending] = collections.deque()
        self._used: dict[int, CheckpointStore] = {}
        self._refused: set[tuple[str, int]] = set()  # (directory, step) found non-finite

    def reset(self) -> None:
        self.async_enabled = False
        self.max_in_flight = 1
        self._refused.clear()  # a new fit may reach the same steps with a finite state

    def enable_async(self, max_in_flight: int) -> None:
        self.async_enabled = True
        self.max_in_flight = max_in_flight

    def save(
        self,
        trainer: Checkpointed,
        store: CheckpointStore,
        *,
        metrics: dict[str, float] | None = None,
        extra_meta: dict[str, Any] | None = None,
        on_refused: Callable[[int], None] | None = None,
        final: bool = False,
    ) -> bool:
        """Saves the trainer's current state to `store`.

        Returns False if nothing is written: the step exists, or (synchronous saves) the state
        is not finite. An async save of a non-finite state is found in the background; then
        `on_refused(step)` runs in the training thread at a later event.

        `final`: the save at the end of a `fit`. When the step is already saved (a periodic
        save of the same step, earlier in the same step's events), its arrays are the same,
        but what happened after that save is not in its meta: the epoch the step ended, the
        last evaluation's effect on the callbacks, a stop. The meta is then replaced, so a
        rerun that restores this step knows how the run ended.
        """
        self.poll()
        step = trainer.step
        if final:
            self.finish(store)
        if (store.directory, step) in self._refused or any(
            p.store.directory == store.directory and p.step == step for p in self._pending
        ):
            return False  # found non-finite, or being written
        # orbax writes one save per directory at a time, so waiting for this store's pending
        # save costs nothing, and it keeps each refusal attributed to its own step. The
        # in-flight bound is applied before the callbacks' states go into `meta`, so a
        # refusal found here is already reflected in them.
        self.finish(store)
        if self.async_enabled:
            while len(self._pending) >= self.max_in_flight:
                self._finish(self._pending.popleft())
        meta = training_meta(trainer)
        if extra_meta:
            meta.update(extra_meta)
        self._used[id(store)] = store
        try:
            # Ctrl-C in the middle of a save would abandon it half-written: the interrupt is
            # held until the save's own part is done, then raised.
            with _interrupts_after():
                saved = store.save(
                    step, trainer.engine.state(), meta, metrics=metrics, async_=self.async_enabled
                )
        except NonFiniteStateError as exc:
            self._refuse(exc, store, on_refused)
            return False
        except Exception as exc:
            raise CheckpointError(
                f"Saving the checkpoint of step {step} to {store.directory} failed: "
                f"{type(exc).__name__}: {_first_line(exc)}. The checkpoints saved before it are "
                "kept; fix the cause (disk space, permissions) and run again to resume."
            ) from exc
        if saved and self.async_enabled:
            self._pending.append(_Pending(store, step, on_refused))
        elif not saved and final and (store.directory, step) not in self._refused:
            store.replace_meta(step, meta)
        return saved

    def finish(self, store: CheckpointStore) -> None:
        """Waits for the pending saves to `store` (a refusal runs its `on_refused`)."""
        for pending in [p for p in self._pending if p.store is store]:
            self._pending.remove(pending)
            self._finish(pending)

    def _finish(self, pending: _Pending) -> None:
        store, step = pending.store, pending.step
        try:
            store.wait()
        except NonFiniteStateError as exc:
            self._refuse(exc, store, pending.on_refused)
        except Exception as exc:
            raise CheckpointError(
                f"Saving the checkpoint of step {step} to {store.directory} failed in the "
                f"background: {type(exc).__name__}: {_first_line(exc)}. The checkpoints saved "
                "before it are kept; fix the cause (disk space, permissions) and run again to "
                "resume."
            ) from exc

    def _refuse(
        self,
        exc: NonFiniteStateError,
        store: CheckpointStore,
        on_refused: Callable[[int], None] | None,
    ) -> None:
        # The step comes from the error (the gate knows it), never from the call that saw it.
        log.warning("%s Nothing was written to %s.", exc, store.directory)
        self._refused.add((store.directory, exc.step))
        if on_refused is not None:
            on_refused(exc.step)

    def poll(self) -> None:
        """Raises the error of any background save that has finished with one."""
        while self._pending and not self._pending[0].store.is_saving():
            self._finish(self._pending.popleft())

    def wait_all(self) -> None:
        """Waits for every pending save and for the removal of old steps, so the directories
        hold exactly what retention keeps; raises the first failure after waiting for all."""
        error = None
        while self._pending:
            try:
                self._finish(self._pending.popleft())
            except CheckpointError as exc:
                error = error or exc
        used, self._used = self._used, {}
        for store in used.values():
            try:
                store.close()
            except Exception as exc:
                error = error or CheckpointError(
                    f"Closing the checkpoint directory {store.directory} failed: "
                    f"{type(exc).__name__}: {exc}"
                )
        if error is not None:
            raise error


@dataclasses.dataclass
class _Pending:
    store: CheckpointStore
    step: int
    on_refused: Callable[[int], None] | None
