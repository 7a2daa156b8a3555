"""Coordinating checkpoint saves: sync or async, the in-flight bound, refusals of a
non-finite state, and a Ctrl-C that arrives in the middle of a save.

What a checkpoint holds is `nnxloop.training_checkpoint`; writing it is `nnxloop.checkpointing`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

from nnxloop._saving.contents import Checkpointed, first_line, process_data, training_meta
from nnxloop.checkpointing import CheckpointError, CheckpointStore, NonFiniteStateError

log = logging.getLogger("nnxloop")


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


class SaveCoordinator:
    """Every checkpoint save of one fit goes through here (a new one for each `fit`).

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
        trainer.before_checkpoint()  # callbacks write out what the checkpoint must cover
        meta = training_meta(trainer)
        if extra_meta:
            meta.update(extra_meta)
        self._used[id(store)] = store
        try:
            # Ctrl-C in the middle of a save would abandon it half-written: the interrupt is
            # held until the save's own part is done, then raised.
            with _interrupts_after():
                saved = store.save(
                    step,
                    trainer.engine.state(),
                    meta,
                    metrics=metrics,
                    async_=self.async_enabled,
                    process_data=process_data(trainer),
                )
        except NonFiniteStateError as exc:
            self._refuse(exc, store, on_refused)
            return False
        except Exception as exc:
            raise CheckpointError(
                f"Saving the checkpoint of step {step} to {store.directory} failed: "
                f"{type(exc).__name__}: {first_line(exc)}. The checkpoints saved before it are "
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
                f"background: {type(exc).__name__}: {first_line(exc)}. The checkpoints saved "
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
