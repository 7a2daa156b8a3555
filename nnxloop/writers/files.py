"""The built-in sinks: TensorBoard event files (tensorboardX), JSON lines, Python logging."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Any

from nnxloop.writers.base import MetricWriter


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
