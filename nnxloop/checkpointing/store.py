"""Writing and restoring checkpoints through an orbax `CheckpointManager`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from nnxloop._rules.ranking import score
from nnxloop.checkpointing import paths
from nnxloop.checkpointing.errors import CheckpointError
from nnxloop.checkpointing.guard import (
    DATA,
    META,
    META_FILE,
    MODEL,
    OPTIMIZER,
    MetaRestore,
    ProcessDataRestore,
    arrays_restore_args,
    guarded_save_args,
    item_handlers,
    non_finite_error,
    process_file,
)
from nnxloop.checkpointing.paths import checkpoint_directory

log = logging.getLogger("nnxloop")


def check_directory(directory: str | os.PathLike[str], *, what: str) -> str:
    """Creates `directory` if needed and checks that files can be written in it.

    `directory` is a local path or a `gs://` URL (see `checkpoint_directory`); it is returned
    as nnxloop keeps it.

    Raises:
        CheckpointError: the path is a file, the directory cannot be created or written, or
            the URL's scheme is not one orbax writes to.
    """
    directory = checkpoint_directory(directory, what=what)
    where = paths.path(directory)
    if where.exists() and not where.is_dir():
        raise CheckpointError(
            f"{what} {directory} is a file, not a directory; pass a directory path."
        )
    try:
        where.mkdir(parents=True, exist_ok=True)
        probe = where / f".nnxloop-write-probe-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise CheckpointError(
            f"{what} {directory} cannot be written ({exc.strerror or exc}); pass a writable "
            "directory."
        ) from exc
    return directory


def _fsync_directory(path: str) -> None:
    """Makes a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def path_shapes(tree: Any) -> dict[str, tuple[list[int], str]]:
    """`{leaf path: (shape, dtype)}` of a state tree, the form stored in `meta`."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[jax.tree_util.keystr(path)] = (list(np.shape(leaf)), str(leaf.dtype))
    return out


def fingerprint(shapes: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()[:16]


def compare_shapes(saved: dict[str, Any], target: dict[str, Any], *, where: str) -> None:
    """Raises a `CheckpointError` naming the first leaf whose path or shape differs."""
    for path, (shape, _dtype) in target.items():
        if path not in saved:
            raise CheckpointError(
                f"{where} has no array for {path} (target shape {tuple(shape)}); the checkpoint "
                "was written by a model with a different structure."
            )
        saved_shape, _ = saved[path]
        if list(saved_shape) != list(shape):
            raise CheckpointError(
                f"{where}: leaf {path} has shape {tuple(saved_shape)} in the checkpoint but "
                f"{tuple(shape)} in the target model; build the model with the same sizes."
            )
    extra = sorted(set(saved) - set(target))
    if extra:
        raise CheckpointError(
            f"{where} holds arrays the target model lacks, e.g. {extra[0]}; the checkpoint was "
            "written by a model with a different structure."
        )


def _finite_key(metric: str, mode: str) -> Callable[[dict[str, float]], float]:
    """orbax's `best_fn` for `best_mode=mode`: the metric, with a non-finite (or missing) one
    the worst value of its mode, so that it is never kept as best."""
    worst = math.inf if mode == "min" else -math.inf

    def key(metrics: dict[str, float]) -> float:
        value = float(metrics.get(metric, worst))
        return value if score(value, mode) != -math.inf else worst

    return key


class CheckpointStore:
    """One checkpoint directory, through an orbax `CheckpointManager`.

    Args:
        directory: where the step directories live.
        max_to_keep: newest checkpoints to keep (or, with `best_metric`, best ones to keep).
        keep_every_steps: also keep every checkpoint whose step is a multiple of this.
        best_metric: rank by this metric (passed to `save`) instead of by recency.
        best_mode: `"min"` or `"max"`, how `best_metric` ranks.
    """

    def __init__(
        self,
        directory: str,
        *,
        max_to_keep: int | None = None,
        keep_every_steps: int | None = None,
        best_metric: str | None = None,
        best_mode: str = "min",
    ):
        self.directory = checkpoint_directory(directory, what="Checkpoint directory")
        self.path = paths.path(self.directory)
        self.max_to_keep = max_to_keep
        self.keep_every_steps = keep_every_steps
        self.best_metric = best_metric
        self.best_mode = best_mode
        self._manager: ocp.CheckpointManager | None = None
        self._manager_async: bool | None = None

    def _options(self, async_: bool) -> ocp.CheckpointManagerOptions:
        kwargs: dict[str, Any] = dict(
            max_to_keep=self.max_to_keep,
            keep_period=self.keep_every_steps,
            enable_async_checkpointing=async_,
            # Old steps are removed by orbax's deleter thread, so that a save does not wait
            # for the file system to unlink the previous one (~0.1 s per 100 MB here).
            enable_background_delete=True,
            create=True,
        )
        if self.best_metric is not None:
            # best_fn also makes orbax persist the metrics, so ranking survives a restart.
            kwargs.update(
                best_fn=_finite_key(self.best_metric, self.best_mode),
                best_mode=self.best_mode,
                keep_checkpoints_without_metrics=False,
            )
        return ocp.CheckpointManagerOptions(**kwargs)

    def manager(self, *, async_: bool = False) -> ocp.CheckpointManager:
        if self._manager is None or self._manager_async != async_:
            self.close()
            self._manager = ocp.CheckpointManager(
                self.directory, options=self._options(async_), item_handlers=item_handlers()
            )
            self._manager_async = async_
        return self._manager

    def steps(self) -> list[int]:
        """Committed steps in the directory, oldest first (incomplete saves are not listed)."""
        if not self.path.is_dir():
            return []
        manager = self.manager(async_=bool(self._manager_async))
        manager.reload()
        return sorted(manager.all_steps())

    def has_step(self, step: int) -> bool:
        """Whether a committed checkpoint of `step` is on disk (no orbax state is touched)."""
        step_dir = self.path / str(step)
        if paths.is_remote(self.directory):
            # In a bucket orbax writes a step in place and commits it with a marker written
            # last: a step directory alone may be a save that never finished.
            return (step_dir / "commit_success.txt").exists()
        return step_dir.is_dir()

    def save(
        self,
        step: int,
        state: nnx.State,
        meta: dict[str, Any],
        *,
        metrics: dict[str, float] | None = None,
        async_: bool = False,
        process_data: dict[str, Any] | None = None,
    ) -> bool:
        """Saves the `(model, optimizer)` state tree at `step`; False if that step exists.

        `process_data` (a JSON object, each process its own) goes into the `data` item, one
        file per process; `read_process_data` gives it back to the same process.

        The state's finiteness is checked on the device while orbax writes; a non-finite
        state raises `NonFiniteStateError` (from `wait` for an async save) and is never
        committed.
        """
        manager = self.manager(async_=async_)
        if step in manager.all_steps():
            return False
        args = guarded_save_args(state, meta, step, process_data)
        with self._refusals():
            return bool(manager.save(step, args=args, metrics=metrics, force=True))

    def replace_meta(self, step: int, meta: dict[str, Any]) -> None:
        """Replaces the JSON `meta` item of the committed `step` (its arrays are untouched).

        The new file is written beside the old one, flushed to disk and renamed over it, so a
        kill at any moment leaves one whole meta or the other. In a bucket, where an object is
        replaced whole or not at all, it is written in place. Process 0 writes it.
        """
        target = self.path / str(step) / META / META_FILE
        if not target.is_file():
            raise CheckpointError(
                f"The checkpoint of step {step} in {self.directory} has no {META}/{META_FILE} "
                "file to update; it is damaged or was not written by nnxloop."
            )
        if jax.process_index() != 0:
            return
        if paths.is_remote(self.directory):
            target.write_text(json.dumps(meta))
            return
        path = os.fspath(target)
        tmp = f"{path}.nnxloop-tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_directory(os.path.dirname(path))

    def is_saving(self) -> bool:
        return self._manager is not None and self._manager.is_saving_in_progress()

    def wait(self) -> None:
        """Blocks until background saves are done; re-raises a background failure (a refused
        non-finite save as `NonFiniteStateError`, its temporary files removed)."""
        if self._manager is None:
            return
        with self._refusals():
            self._manager.wait_until_finished()

    @contextlib.contextmanager
    def _refusals(self):
        """Turns a refused save (however orbax wraps it) into its `NonFiniteStateError`,
        after removing what it wrote; any other error passes unchanged."""
        try:
            yield
        except Exception as exc:
            refused = non_finite_error(exc)
            if refused is None:
                raise
            self.discard(refused.step)
            raise refused from None

    def discard(self, step: int) -> None:
        """Forgets a save of `step` that failed before its commit: removes its temporary
        directory and re-reads the committed steps (orbax's in-memory list already had it)."""
        if jax.process_count() > 1:  # every process's writes into it have finished
            multihost_utils.sync_global_devices(f"nnxloop-discard-{self.directory}-{step}")
        if jax.process_index() == 0 and self.path.is_dir():
            for leftover in self.path.glob(f"{step}.orbax-checkpoint-tmp*"):
                with contextlib.suppress(OSError):
                    leftover.rmtree()
        if self._manager is not None:
            self._manager.reload()

    def close(self) -> None:
        if self._manager is not None:
            manager, self._manager = self._manager, None
            manager.close()

    def read_meta(self, step: int) -> dict[str, Any]:
        restored = self.manager(async_=bool(self._manager_async)).restore(
            step, args=ocp.args.Composite(**{META: MetaRestore()})
        )
        return dict(restored[META])

    def read_process_data(self, step: int) -> dict[str, Any] | None:
        """What this process saved as `process_data` at `step`, or None when the step holds
        no file of this process (written by another number of processes, or by one)."""
        if not (self.path / str(step) / DATA / process_file()).exists():
            return None
        restored = self.manager(async_=bool(self._manager_async)).restore(
            step, args=ocp.args.Composite(**{DATA: ProcessDataRestore()})
        )
        return dict(restored[DATA])

    def restore(
        self, step: int, abstract_model: Any, abstract_optimizer: Any = None
    ) -> tuple[Any, Any]:
        """Restores the model (and, when given a target for it, optimizer) state of `step`
        into the shapes and shardings of the abstract targets."""
        manager = self.manager(async_=bool(self._manager_async))
        args = {MODEL: arrays_restore_args(abstract_model)}
        if abstract_optimizer is not None:
            args[OPTIMIZER] = arrays_restore_args(abstract_optimizer)
        restored = manager.restore(step, args=ocp.args.Composite(**args))
        optimizer = restored[OPTIMIZER] if abstract_optimizer is not None else None
        return restored[MODEL], optimizer

    def restore_as_saved(
        self, step: int, sharding: jax.sharding.Sharding, *, item: str = MODEL
    ) -> Any:
        """The `model` item (or the `optimizer` item) of `step` in the tree it was saved as
        (nested dicts with string keys, as orbax stores a state), every array placed with
        `sharding`."""
        manager = self.manager(async_=bool(self._manager_async))
        saved = manager.item_metadata(step)[item]
        if saved is None:
            raise CheckpointError(
                f"The checkpoint of step {step} in {self.directory} has no {item} item."
            )
        abstract = jax.tree.map(
            lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
            dict(saved),
        )
        restored = manager.restore(
            step, args=ocp.args.Composite(**{item: arrays_restore_args(abstract)})
        )
        return restored[item]

    def set_aside(self) -> list[str]:
        """The steps `quarantine` moved aside in this directory, by earlier runs too."""
        if not self.path.is_dir():
            return []
        return sorted(os.fspath(p) for p in self.path.glob("*.unreadable-*"))

    def quarantine(self, step: int) -> str:
        """Renames an unreadable step aside (orbax then ignores it); nothing is deleted."""
        src = self.path / str(step)
        dst = self.path / f"{step}.unreadable-{time.time_ns()}"
        src.rename(dst)  # in a bucket: every object copied, then deleted
        self.manager(async_=bool(self._manager_async)).reload()
        return os.fspath(dst)
