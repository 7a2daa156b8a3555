"""SIGTERM handling: a preemption notice becomes a clean stop at the next step boundary."""

from __future__ import annotations

import contextlib
import signal
import threading


class PreemptionWatcher:
    """Records SIGTERM while installed; the training loop polls `requested` between steps.

    The handler only sets a flag, so a signal during compilation or evaluation is acted on at
    the next step boundary. In a multi-process run, every process must agree on the step to
    stop at; `requested` is the one place to combine the flags of all processes.
    """

    def __init__(self) -> None:
        self._flag = threading.Event()

    @property
    def requested(self) -> bool:
        return self._flag.is_set()

    def _handle(self, signum, frame) -> None:
        self._flag.set()

    @contextlib.contextmanager
    def installed(self):
        """Installs the handler for the duration of the block, then restores the previous one."""
        if threading.current_thread() is not threading.main_thread():
            # Signal handlers can only be set from the main thread; there is nothing to catch.
            yield self
            return
        previous = signal.signal(signal.SIGTERM, self._handle)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)
