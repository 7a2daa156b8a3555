"""Writers made of writers: `MultiWriter` (several sinks as one) and `BackgroundWriter`
(a sink written off the training thread)."""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from nnxloop.writers.base import MetricWriter


class MultiWriter(MetricWriter):
    """Sends every call to each of `writers`."""

    def __init__(self, writers: Sequence[MetricWriter]):
        self.writers = list(writers)

    def write_scalars(self, step, scalars):
        for w in self.writers:
            w.write_scalars(step, scalars)

    def write_hparams(self, hparams):
        for w in self.writers:
            w.write_hparams(hparams)

    def write_texts(self, step, texts):
        for w in self.writers:
            w.write_texts(step, texts)

    def flush(self):
        for w in self.writers:
            w.flush()

    def end_run(self, status):
        for w in self.writers:
            w.end_run(status)

    def close(self):
        """Closes every writer, also when one fails; then raises the first failure."""
        first: BaseException | None = None
        for w in self.writers:
            try:
                w.close()
            except Exception as exc:
                first = first or exc
        if first is not None:
            raise first


class BackgroundWriter(MetricWriter):
    """Runs another writer's calls on a thread of its own, so a slow one (a tracker over the
    network) never makes the caller wait, except in `flush` and `close`.

    At most `max_pending` lines (`write_scalars` calls) wait; when a writer cannot keep up, the
    oldest waiting lines are dropped to make room, with one warning naming the writer (never an
    unbounded queue, never a stalled step). A writer that raises is reported with one warning
    and receives nothing more; the other writers go on.

    Args:
        writer: the writer to run in the background.
        max_pending: how many lines may wait.
    """

    def __init__(self, writer: MetricWriter, *, max_pending: int = 1000):
        self.writer = writer
        self.max_pending = max_pending
        # How long `close` waits for the writer's thread; None: until it is done. After an
        # error the logger bounds it, so an unreachable tracker cannot hold up the exit.
        self.close_timeout: float | None = None
        self.dropped = 0
        self.failed: BaseException | None = None
        self._pending: collections.deque[tuple[str, tuple[Any, ...]]] = collections.deque()
        self._cond = threading.Condition()
        self._busy = False
        self._closed = False
        self._abandoned = False  # closed without waiting for the thread (see close)
        self._thread = threading.Thread(
            target=self._run, name=f"nnxloop-{type(writer).__name__}", daemon=True
        )
        self._thread.start()

    def _put(self, method: str, *args: Any) -> None:
        with self._cond:
            if self.failed is not None or self._closed:
                return
            lines = sum(name == "write_scalars" for name, _ in self._pending)
            if method == "write_scalars" and lines >= self.max_pending:
                # Only lines are bounded and dropped: a flush, a close or the run's
                # description always gets through.
                oldest = next(i for i, (name, _) in enumerate(self._pending) if name == method)
                del self._pending[oldest]
                if not self.dropped:
                    logging.getLogger("nnxloop").warning(
                        "%s cannot keep up with the metric lines: dropping the oldest waiting "
                        "lines (at most %d wait). Log less often (every_steps) or use a faster "
                        "writer.",
                        type(self.writer).__name__,
                        self.max_pending,
                    )
                self.dropped += 1
            self._pending.append((method, args))
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return
                method, args = self._pending.popleft()
                self._busy = True
            try:
                if self.failed is None and not self._abandoned:
                    getattr(self.writer, method)(*args)
            except Exception as exc:  # a tracker's failure must not end training
                self.failed = exc
                logging.getLogger("nnxloop").warning(
                    "%s failed and is left out from here on (%s: %s).",
                    type(self.writer).__name__,
                    type(exc).__name__,
                    exc,
                )
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _drain(self) -> None:
        with self._cond:
            while self._pending or self._busy:
                self._cond.wait()

    def write_scalars(self, step, scalars):
        self._put("write_scalars", step, dict(scalars))

    def write_hparams(self, hparams):
        self._put("write_hparams", dict(hparams))

    def write_texts(self, step, texts):
        self._put("write_texts", step, dict(texts))

    def flush(self):
        """Waits until every call so far has reached the writer, then flushes it."""
        self._put("flush")
        self._drain()

    def end_run(self, status):
        self._put("end_run", status)

    def close(self):
        self._put("close")
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(self.close_timeout)
        if self._thread.is_alive():
            # Left behind: the call in flight may still finish, nothing after it reaches the
            # writer (which the next fit may already be using).
            with self._cond:
                waiting = sum(name == "write_scalars" for name, _ in self._pending)
                self._pending.clear()
                self._abandoned = True
            logging.getLogger("nnxloop").warning(
                "%s did not finish within %g s; the %d metric lines still waiting for it are "
                "not written, nor the one it is writing, if it is.",
                type(self.writer).__name__,
                self.close_timeout or 0,
                waiting,
            )

    def state_dict(self) -> dict[str, Any]:
        state = getattr(self.writer, "state_dict", None)
        return state() if callable(state) else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        load = getattr(self.writer, "load_state_dict", None)
        if callable(load):
            load(state)
