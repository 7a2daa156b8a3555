"""Metric writers with CLU's method names, without CLU's TensorFlow import.

`clu.metric_writers` imports TensorFlow when imported, so nnxloop keeps a small interface with
the same methods (`write_scalars`, `write_hparams`, `write_texts`, `flush`, `close`) and three
backends: TensorBoard event files (tensorboardX), JSON lines, and Python logging; and
`MLflowWriter` for an MLflow tracking server or store and `WandbWriter` for a Weights & Biases
run (written in `nnxloop.trackers`, named here), run off the training thread by
`BackgroundWriter`.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from nnxloop.metric_writer import MetricWriter, Scalars

# The trackers are written in their own module (each imports its library only when built) and
# named here with the other writers: `nl.writers.MLflowWriter`, `nl.writers.WandbWriter`.
from nnxloop.trackers import MLflowWriter, WandbWriter


class TensorBoardWriter(MetricWriter):
    """TensorBoard event files under `logdir`, with tensorboardX's protocol buffers and record
    format (no TensorFlow needed).

    Events are written in the caller's thread (a few hundred bytes each, into the file's
    buffer), so a write error, a full disk say, is raised to the caller instead of ending a
    background thread, and `flush` makes every event written so far durable (fsync).

    Args:
        logdir: the directory for the event files.
        purge_step: TensorBoard hides points at this step and later written by earlier runs in
            `logdir` (a resumed run passes the first step it will write).
    """

    def __init__(self, logdir: str, *, purge_step: int | None = None):
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        from tensorboardX.record_writer import RecordWriter

        self._event_type = Event
        self.logdir = logdir
        os.makedirs(logdir, exist_ok=True)
        # TensorBoard reads a directory's event files in name order: the time comes first.
        name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}.nnxloop"
        self.path = os.path.join(logdir, name)
        self._records = RecordWriter(self.path)
        self._write(Event(step=purge_step or 0, file_version="brain.Event:2"))
        if purge_step is not None:
            self._write(Event(step=purge_step, session_log=SessionLog(status=SessionLog.START)))

    def _write(self, event: Any) -> None:
        event.wall_time = time.time()
        self._records.write(event.SerializeToString())

    def _summary(self, step: int, summary: Any) -> None:
        self._write(self._event_type(step=int(step), summary=summary))

    def write_scalars(self, step, scalars):
        from tensorboardX import summary

        for name, value in scalars.items():
            self._summary(step, summary.scalar(str(name), float(value)))

    def write_hparams(self, hparams):
        from tensorboardX import summary

        clean = {
            str(k): v if isinstance(v, (bool, int, float, str)) else str(v)
            for k, v in hparams.items()
        }
        for part in summary.hparams(clean, {}):  # experiment, session start, session end
            self._summary(0, part)

    def write_texts(self, step, texts):
        from tensorboardX import summary

        for name, text in texts.items():
            self._summary(step, summary.text(str(name), text))

    def flush(self):
        self._records.flush()  # flushes the buffer and fsyncs the file

    def close(self):
        try:
            self.flush()
        finally:
            self._records.close()


class JsonlWriter(MetricWriter):
    """Appends one JSON object per `write_scalars` call to `path`: `step`, `time`, the values.

    Args:
        path: the `.jsonl` file.
        resume_step: when the file exists, lines with a step after this one (written by a run
            that was killed after its last checkpoint) are dropped, so a resumed run does not
            duplicate them.
    """

    def __init__(self, path: str, *, resume_step: int | None = None):
        self.path = path
        if resume_step is not None and os.path.exists(path):
            self._truncate_after(resume_step)
        self._file = open(path, "a")  # noqa: SIM115 - closed in close()

    def _truncate_after(self, step: int) -> None:
        with open(self.path) as f:
            lines = f.readlines()
        kept = []
        for line in lines:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue  # a half-written last line from a killed run
        if len(kept) != len(lines):
            tmp = f"{self.path}.tmp"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, self.path)

    def write_scalars(self, step, scalars):
        record = {"step": int(step), "time": time.time()}
        record.update({str(k): float(v) for k, v in scalars.items()})
        self._file.write(json.dumps(record) + "\n")

    def flush(self):
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self):
        if not self._file.closed:
            try:
                self.flush()
            finally:
                self._file.close()


class LoggingWriter(MetricWriter):
    """Writes scalars as one `logging` line per call (logger `nnxloop.metrics`)."""

    def __init__(self, logger: logging.Logger | None = None, level: int = logging.INFO):
        self._log = logger or logging.getLogger("nnxloop.metrics")
        self._level = level

    def write_scalars(self, step, scalars):
        text = ", ".join(f"{k}={v:.6g}" for k, v in scalars.items())
        self._log.log(self._level, "step %d: %s", step, text)

    def write_texts(self, step, texts):
        for name, text in texts.items():
            self._log.log(self._level, "step %d %s:\n%s", step, name, text)


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


__all__ = [
    "BackgroundWriter",
    "JsonlWriter",
    "LoggingWriter",
    "MLflowWriter",
    "MetricWriter",
    "MultiWriter",
    "Scalars",
    "TensorBoardWriter",
    "WandbWriter",
]
