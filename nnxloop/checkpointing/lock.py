"""One writer per checkpoint directory: a lock file held for the life of a `fit`.

Two live runs writing one directory would interleave their steps and resume each other's
weights. The lock is a file `.nnxloop-lock` in the directory, holding the writer's host, PID
and start time. A holder that is gone does not keep it:

- on the same host, a holder whose PID no longer runs (killed with `kill -9`, say) is gone;
- on another host (whose PIDs cannot be checked from here), a holder is gone once it has not
  refreshed the file for `STALE_AFTER` seconds: a live holder refreshes it every
  `REFRESH_EVERY` seconds from a background thread.

Several processes of one run share the lock: process 0 holds it for all.

In a bucket (`gs://`), where a file cannot be created exclusively, the lock is written, then
read back: the run whose holding is read back owns it. The holder refreshes a `refreshed` time
in the file, and a holder on another machine is gone once that is `STALE_AFTER` seconds old.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from typing import Any

import jax

from nnxloop.checkpointing import paths
from nnxloop.checkpointing.errors import CheckpointError

log = logging.getLogger("nnxloop")

LOCK_FILE = ".nnxloop-lock"
REFRESH_EVERY = 30.0
STALE_AFTER = 120.0

_held: dict[str, _Holding] = {}  # directory -> this process's holding (re-entrant)
_held_guard = threading.Lock()


class _Holding:
    def __init__(self, path: str, me: dict[str, Any]):
        self.path = path
        self.me = me
        self.count = 1
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._refresh, name="nnxloop-lock", daemon=True)
        self.thread.start()

    def _refresh(self) -> None:
        while not self.stop.wait(REFRESH_EVERY):
            with contextlib.suppress(OSError, CheckpointError):  # the next save fails instead
                if not paths.is_remote(self.path):
                    os.utime(self.path)
                elif _ours(self.path, self.me):
                    _write_remote(self.path, self.me)
                else:  # in a bucket, another run wrote its lock over ours at the same time
                    log.warning(
                        "The lock %s now names another run: two runs may be writing this "
                        "bucket directory. Stop one of them.",
                        self.path,
                    )
                    return


def _ours(path: str, me: dict[str, Any]) -> bool:
    found = _read_remote(path)
    return found is not None and {k: found[0].get(k) for k in me} == me


def _write_remote(path: str, me: dict[str, Any]) -> None:
    paths.path(path).write_text(json.dumps({**me, "refreshed": time.time()}))


def _read_remote(path: str) -> tuple[dict[str, Any], float] | None:
    target = paths.path(path)
    try:
        holder = json.loads(target.read_text())
    except FileNotFoundError:
        return None
    except ValueError:  # cut short or not nnxloop's: judged by its age alone
        return {}, _age_time(target)
    except OSError as exc:  # the bucket could not be read: never count a lock as gone then
        raise CheckpointError(
            f"Could not read the lock {path} ({exc}); try again, or check access to the bucket."
        ) from exc
    refreshed = holder.get("refreshed") if isinstance(holder, dict) else None
    if not isinstance(holder, dict) or not isinstance(refreshed, int | float):
        return {}, _age_time(target)
    return holder, float(refreshed)


def _age_time(target: Any) -> float:
    try:
        return float(target.stat().mtime)
    except (OSError, ValueError, AttributeError):
        return 0.0


def _alive_here(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def _read(path: str) -> tuple[dict[str, Any], float] | None:
    if paths.is_remote(path):
        return _read_remote(path)
    try:
        with open(path) as f:
            holder = json.load(f)
        return holder, os.path.getmtime(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}, os.path.getmtime(path) if os.path.exists(path) else 0.0


def _is_live(holder: dict[str, Any], mtime: float) -> bool:
    host, pid = holder.get("host"), holder.get("pid")
    if host == socket.gethostname() and isinstance(pid, int):
        # This very process does not hold it (`_held` says so): it names a run before a
        # restart (a container often gets the same host name and PID again).
        return pid != os.getpid() and _alive_here(pid)
    return time.time() - mtime < STALE_AFTER


def acquire(directory: str) -> None:
    """Takes the lock of `directory` for this process (again, if it holds it already).

    Raises:
        CheckpointError: another live run holds it; the message names its host and PID.
    """
    if jax.process_index() != 0:
        return
    directory = paths.checkpoint_directory(directory, what="Checkpoint directory")
    path = (
        f"{directory}/{LOCK_FILE}"
        if paths.is_remote(directory)
        else os.path.join(directory, LOCK_FILE)
    )
    with _held_guard:
        holding = _held.get(directory)
        if holding is not None:
            holding.count += 1
            return
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        for _ in range(3):
            if _try_create(path, me):
                _held[directory] = _Holding(path, me)
                return
            found = _read(path)
            if found is None:
                continue  # released meanwhile
            holder, mtime = found
            if holder == {**me, "refreshed": holder.get("refreshed")}:
                _held[directory] = _Holding(path, me)  # ours, read back from a bucket
                return
            if _is_live(holder, mtime):
                raise CheckpointError(
                    f"{directory} is being written by another run (host "
                    f"{holder.get('host')}, PID {holder.get('pid')}, since "
                    f"{time.ctime(holder.get('started', mtime))}). Two runs in one "
                    "directory would mix their checkpoints: wait for it to end, stop it, or "
                    f"use another directory. (If that run is gone, delete {path}.)"
                )
            log.warning(
                "Taking over the lock of %s from a run that is gone (host %s, PID %s).",
                directory,
                holder.get("host"),
                holder.get("pid"),
            )
            _remove(path)
        raise CheckpointError(f"Could not take the lock {path}; another run keeps taking it.")


def _try_create(path: str, me: dict[str, Any]) -> bool:
    """Creates the lock file holding `me`; False when one exists. In a bucket, a lock is
    written only where none is, and whose it is shows when it is read back."""
    if paths.is_remote(path):
        if paths.path(path).exists():
            return False
        _write_remote(path, me)
        return False  # read back by the caller
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(me, f)
    return True


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        if paths.is_remote(path):
            paths.path(path).unlink()
        else:
            os.remove(path)


def release(directory: str) -> None:
    """Gives up this process's lock of `directory` (once for each `acquire`)."""
    if jax.process_index() != 0:
        return
    directory = paths.checkpoint_directory(directory, what="Checkpoint directory")
    with _held_guard:
        holding = _held.get(directory)
        if holding is None:
            return
        holding.count -= 1
        if holding.count:
            return
        del _held[directory]
        holding.stop.set()
        if paths.is_remote(holding.path):
            with contextlib.suppress(OSError, CheckpointError):
                if _ours(holding.path, holding.me):  # never another run's lock
                    _remove(holding.path)
        else:
            _remove(holding.path)
