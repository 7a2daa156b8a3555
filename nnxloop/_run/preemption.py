"""SIGTERM handling: a preemption notice becomes a clean stop at a step boundary that every
process agrees on."""

from __future__ import annotations

import contextlib
import signal
import threading

import jax


def _sync_service_running() -> bool:
    from jax._src import distributed

    return jax.process_count() > 1 and distributed.global_state.preemption_sync_manager is not None


class PreemptionWatcher:
    """Tells the training loop, at each dispatch boundary, whether to stop for a preemption.

    One process: a SIGTERM handler (installed only while `fit` runs) sets a flag, so a signal
    during compilation or evaluation is acted on at the next boundary. Several processes: JAX's
    preemption service (started by `jax.distributed.initialize`) catches the signal on any
    process and `reached_preemption_sync_point` answers True on the same boundary everywhere,
    so all processes stop and save at the same step. Its cost is a local check per dispatch.
    """

    def __init__(self) -> None:
        self._flag = threading.Event()

    def should_stop(self, boundary: int) -> bool:
        """Whether to stop at dispatch boundary number `boundary` (counted from 0 each fit)."""
        if _sync_service_running():
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(boundary)
        return self._flag.is_set()

    def _handle(self, signum, frame) -> None:
        self._flag.set()

    @contextlib.contextmanager
    def installed(self):
        """Installs the handler for the duration of the block, then restores the previous one."""
        self._flag.clear()
        if threading.current_thread() is not threading.main_thread() or _sync_service_running():
            # Handlers can only be set from the main thread; with several processes, JAX's
            # preemption service owns SIGTERM.
            yield self
            return
        previous = signal.signal(signal.SIGTERM, self._handle)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)
