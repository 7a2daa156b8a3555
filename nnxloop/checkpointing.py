"""Checkpoint I/O: the one module that talks to orbax.

A checkpoint is a plain orbax `CheckpointManager` step directory with three items:

- `model`: the full `nnx.state(model)` (parameters, batch statistics, RNG state), readable with
  plain orbax and `nnx.update`, no nnxloop needed;
- `optimizer`: the `nnx.Optimizer` state (step count and optax state);
- `meta`: JSON with the step, epoch, position in the epoch, data-iterator state, every
  callback's `state_dict`, a fingerprint of the state's structure and the model's array shapes.

Retention, atomic commits and background writing are orbax's; this module only decides which
orbax options a directory gets and turns orbax's failures into errors that say what to do.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

if TYPE_CHECKING:
    from nnxloop.trainer import Trainer

log = logging.getLogger("nnxloop")

MODEL, OPTIMIZER, META = "model", "optimizer", "meta"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says which and why."""


def check_directory(directory: str, *, what: str) -> str:
    """Creates `directory` if needed and checks that files can be written in it.

    Raises:
        CheckpointError: the path is a file, or the directory cannot be created or written.
    """
    path = os.path.abspath(os.fspath(directory))
    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(f"{what} {path} is a file, not a directory; pass a directory path.")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".nnxloop-write-probe-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as exc:
        raise CheckpointError(
            f"{what} {path} cannot be written ({exc.strerror or exc}); pass a writable directory."
        ) from exc
    return path


def path_shapes(tree: Any) -> dict[str, tuple[list[int], str]]:
    """`{leaf path: (shape, dtype)}` of a state tree, the form stored in `meta`."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[jax.tree_util.keystr(path)] = (list(np.shape(leaf)), str(leaf.dtype))
    return out


def _fingerprint(shapes: dict[str, Any]) -> str:
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
    worst = math.inf if mode == "min" else -math.inf

    def key(metrics: dict[str, float]) -> float:
        value = float(metrics.get(metric, worst))
        return value if math.isfinite(value) else worst  # NaN never ranks as best

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
        self.directory = os.path.abspath(os.fspath(directory))
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
            self._manager = ocp.CheckpointManager(self.directory, options=self._options(async_))
            self._manager_async = async_
        return self._manager

    def steps(self) -> list[int]:
        """Committed steps in the directory, oldest first (incomplete saves are not listed)."""
        if not os.path.isdir(self.directory):
            return []
        manager = self.manager(async_=bool(self._manager_async))
        manager.reload()
        return sorted(manager.all_steps())

    def has_step(self, step: int) -> bool:
        """Whether a committed checkpoint of `step` is on disk (no orbax state is touched)."""
        return os.path.isdir(os.path.join(self.directory, str(step)))

    def save(
        self,
        step: int,
        state: nnx.State,
        meta: dict[str, Any],
        *,
        metrics: dict[str, float] | None = None,
        async_: bool = False,
    ) -> bool:
        """Saves the `(model, optimizer)` state tree at `step`; False if that step exists."""
        manager = self.manager(async_=async_)
        if step in manager.all_steps():
            return False
        args = ocp.args.Composite(
            **{
                MODEL: ocp.args.StandardSave(state[0]),
                OPTIMIZER: ocp.args.StandardSave(state[1]),
                META: ocp.args.JsonSave(meta),
            }
        )
        return bool(manager.save(step, args=args, metrics=metrics, force=True))

    def is_saving(self) -> bool:
        return self._manager is not None and self._manager.is_saving_in_progress()

    def wait(self) -> None:
        """Blocks until background saves are done; re-raises a background failure."""
        if self._manager is not None:
            self._manager.wait_until_finished()

    def close(self) -> None:
        if self._manager is not None:
            manager, self._manager = self._manager, None
            manager.close()

    def read_meta(self, step: int) -> dict[str, Any]:
        restored = self.manager(async_=bool(self._manager_async)).restore(
            step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()})
        )
        return dict(restored[META])

    def restore(
        self, step: int, abstract_model: Any, abstract_optimizer: Any = None
    ) -> tuple[Any, Any]:
        """Restores the model (and, when given a target for it, optimizer) state of `step`
        into the shapes and shardings of the abstract targets."""
        manager = self.manager(async_=bool(self._manager_async))
        args = {MODEL: ocp.args.StandardRestore(abstract_model)}
        if abstract_optimizer is not None:
            args[OPTIMIZER] = ocp.args.StandardRestore(abstract_optimizer)
        restored = manager.restore(step, args=ocp.args.Composite(**args))
        optimizer = restored[OPTIMIZER] if abstract_optimizer is not None else None
        return restored[MODEL], optimizer

    def quarantine(self, step: int) -> str:
        """Renames an unreadable step aside (orbax then ignores it); nothing is deleted."""
        src = os.path.join(self.directory, str(step))
        dst = f"{src}.unreadable-{int(time.time())}"
        os.rename(src, dst)
        self.manager(async_=bool(self._manager_async)).reload()
        return dst


def all_finite(leaves: list[jax.Array]) -> bool:
    """True when every floating-point leaf is finite (one small device reduction)."""
    floats = [x for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
    if not floats:
        return True
    return bool(_all_finite(floats))


@jax.jit
def _all_finite(leaves):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


# -- what a training checkpoint holds -----------------------------------------------------


def _callback_key(index: int, callback: Any) -> str:
    return f"{index}:{type(callback).__name__}"


def training_meta(trainer: Trainer) -> dict[str, Any]:
    """The JSON item of a training checkpoint for the trainer's current state."""
    engine = trainer.engine
    shapes = path_shapes(engine.state()[0])
    # Each process has its own iterator but orbax writes the JSON item from process 0 only,
    # so with several processes a resume skips to the position instead.
    data_state = trainer.data_state() if jax.process_count() == 1 else None
    try:
        json.dumps(data_state)
    except TypeError:
        log.warning("The data iterator's state is not JSON-serialisable; it is not checkpointed.")
        data_state = None
    return {
        "step": trainer.step,
        "epoch": trainer.epoch,
        "position": trainer.position,
        "data_state": data_state,
        "callbacks": {
            _callback_key(i, cb): cb.state_dict() for i, cb in enumerate(trainer.callbacks)
        },
        "fingerprint": _fingerprint(path_shapes(engine.state())),
        "model_shapes": shapes,
        "device_count": jax.device_count(),
        "steps_per_dispatch": trainer.steps_per_dispatch,
        "time": time.time(),
        "nnxloop_version": _version(),
    }


def _version() -> str:
    from nnxloop import __version__

    return __version__


def restore_training(trainer: Trainer, store: CheckpointStore) -> int | None:
    """Restores the newest readable checkpoint of `store` into `trainer`; returns its step.

    A checkpoint that fails to read is renamed aside with a warning naming its step, and the
    next older one is tried, so a damaged newest checkpoint never blocks a restart.
    """
    engine = trainer.engine
    abstract = engine.abstract_state()
    model_shapes = path_shapes(abstract[0])
    fingerprint = _fingerprint(path_shapes(abstract))
    for step in reversed(store.steps()):
        try:
            meta = store.read_meta(step)
            if meta.get("fingerprint") != fingerprint:
                where = f"The checkpoint at step {step} in {store.directory}"
                compare_shapes(meta.get("model_shapes", {}), model_shapes, where=where)
                raise CheckpointError(
                    f"{where} holds an optimizer state of another structure; resume with the "
                    "optimizer it was written with, or start in a new directory."
                )
            model_state, opt_state = store.restore(step, abstract[0], abstract[1])
        except CheckpointError:
            raise
        except Exception as exc:  # orbax raises many types for damaged files
            moved = store.quarantine(step)
            log.warning(
                "Checkpoint step %d in %s is unreadable (%s: %s); moved it to %s and trying "
                "the previous one.",
                step,
                store.directory,
                type(exc).__name__,
                str(exc).splitlines()[0][:200] if str(exc) else "",
                moved,
            )
            continue
        engine.set_leaves(jax.tree.leaves(model_state) + jax.tree.leaves(opt_state))
        trainer.restore_progress(
            step=meta["step"],
            epoch=meta["epoch"],
            position=meta["position"],
            data_state=meta.get("data_state"),
        )
        states = meta.get("callbacks", {})
        for i, cb in enumerate(trainer.callbacks):
            key = _callback_key(i, cb)
            if key in states:
                cb.load_state_dict(states[key])
        return step
    return None


class SaveCoordinator:
    """Every checkpoint save of one trainer goes through here.

    It refuses to write a state with non-finite values, and, once `AsyncSaveCallback` turns
    asynchronous saving on, bounds the saves in flight and re-raises a background failure in
    the training thread, naming the step.
    """

    def __init__(self) -> None:
        self.async_enabled = False
        self.max_in_flight = 1
        self._pending: collections.deque[tuple[CheckpointStore, int]] = collections.deque()

    def reset(self) -> None:
        self.async_enabled = False
        self.max_in_flight = 1

    def enable_async(self, max_in_flight: int) -> None:
        self.async_enabled = True
        self.max_in_flight = max_in_flight

    def save(
        self,
        trainer: Trainer,
        store: CheckpointStore,
        *,
        metrics: dict[str, float] | None = None,
        extra_meta: dict[str, Any] | None = None,
    ) -> bool:
        """Saves the trainer's current state to `store`; False if skipped (exists, non-finite)."""
        self.poll()
        step = trainer.step
        if not all_finite(trainer.engine.leaves):
            log.warning(
                "Not saving step %d to %s: the model or optimizer state has non-finite values.",
                step,
                store.directory,
            )
            return False
        meta = training_meta(trainer)
        if extra_meta:
            meta.update(extra_meta)
        if self.async_enabled:
            while len(self._pending) >= self.max_in_flight:
                self._finish(*self._pending.popleft())
        saved = store.save(
            step, trainer.engine.state(), meta, metrics=metrics, async_=self.async_enabled
        )
        if saved and self.async_enabled:
            self._pending.append((store, step))
        return saved

    def _finish(self, store: CheckpointStore, step: int) -> None:
        try:
            store.wait()
        except Exception as exc:
            raise CheckpointError(
                f"Saving the checkpoint of step {step} to {store.directory} failed in the "
                f"background: {type(exc).__name__}: {exc}"
            ) from exc

    def poll(self) -> None:
        """Raises the error of any background save that has finished with one."""
        while self._pending and not self._pending[0][0].is_saving():
            self._finish(*self._pending.popleft())

    def wait_all(self) -> None:
        """Waits for every pending save; raises the first failure after waiting for all."""
        error = None
        while self._pending:
            try:
                self._finish(*self._pending.popleft())
            except CheckpointError as exc:
                error = error or exc
        if error is not None:
            raise error


# -- reading a directory without restoring arrays (`nnxloop inspect`) ---------------------

COMPLETE, INCOMPLETE, UNREADABLE = "complete", "incomplete", "unreadable"

# An interrupted save (orbax's temporary directory) and a step a resume moved aside.
_NOT_COMMITTED = (
    (re.compile(r"^(\d+)\.orbax-checkpoint-tmp"), INCOMPLETE),
    (re.compile(r"^(\d+)\.unreadable-"), UNREADABLE),
)


@dataclasses.dataclass(frozen=True)
class StepSummary:
    """One step directory of a checkpoint directory, as `list_checkpoints` finds it.

    Attributes:
        step: the training step.
        name: the directory's name (`"12"`, or e.g. `"9.orbax-checkpoint-tmp-123"`).
        status: `"complete"` (committed and its `meta` item reads), `"incomplete"` (a save
            that never committed) or `"unreadable"` (moved aside by a resume, or its `meta`
            item fails to read; `error` says why).
        size_bytes: the size of the files under the step directory.
        meta: the `meta` item, for complete steps written by nnxloop.
        metrics: the metrics orbax saved with the step (best-k directories), if any.
        error: why a committed step is unreadable.
    """

    step: int
    name: str
    status: str
    size_bytes: int
    meta: dict[str, Any] | None = None
    metrics: dict[str, float] | None = None
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class ArraySummary:
    """Shape, dtype and sharding of one saved array, as recorded by the process that saved it."""

    path: str
    shape: tuple[int, ...] | None
    dtype: str
    sharding: str


def _reader(directory: str) -> ocp.CheckpointManager:
    # Never `create` (inspecting must not make directories) and never clean up temporary
    # directories: they are what `list_checkpoints` reports as interrupted saves.
    return ocp.CheckpointManager(
        directory,
        item_handlers={
            MODEL: ocp.StandardCheckpointHandler(),
            OPTIMIZER: ocp.StandardCheckpointHandler(),
            META: ocp.JsonCheckpointHandler(),
        },
        options=ocp.CheckpointManagerOptions(create=False, cleanup_tmp_directories=False),
    )


def _existing_directory(directory: str | os.PathLike) -> str:
    path = os.path.abspath(os.fspath(directory))
    if not os.path.exists(path):
        raise CheckpointError(f"Checkpoint directory {path} does not exist.")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is a file, not a checkpoint directory.")
    return path


def _size_bytes(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:  # removed while we walk, e.g. by a running save
                pass
    return total


def _first_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError as exc:
        raise CheckpointError(f"{path} cannot be read ({exc.strerror or exc}).") from exc


def _not_a_checkpoint_directory(path: str) -> CheckpointError:
    def holds_steps(sub: str) -> bool:
        try:
            return os.path.isdir(sub) and any(n.isdigit() for n in os.listdir(sub))
        except OSError:
            return False

    below = sorted(n for n in _listdir(path) if holds_steps(os.path.join(path, n)))
    hint = f"; these subdirectories hold checkpoints: {', '.join(below)}" if below else ""
    return CheckpointError(
        f"{path} is not a checkpoint directory (it has no step directories){hint}."
    )


def _uncommitted(path: str, committed: list[int]) -> list[tuple[int, str, str]]:
    """`(step, name, status)` of the step directories orbax does not count as committed."""
    found = []
    for name in _listdir(path):
        if not os.path.isdir(os.path.join(path, name)):
            continue
        if name.isdigit():
            if int(name) not in committed:  # orbax saw no commit marker: interrupted too
                found.append((int(name), name, INCOMPLETE))
            continue
        for pattern, status in _NOT_COMMITTED:
            if match := pattern.match(name):
                found.append((int(match.group(1)), name, status))
    return found


def list_checkpoints(directory: str | os.PathLike) -> list[StepSummary]:
    """Every step directory in `directory`, committed or not, by step; no array is read.

    Raises:
        CheckpointError: `directory` does not exist, is a file, or holds no step directories.
    """
    path = _existing_directory(directory)
    manager = _reader(path)
    try:
        committed = sorted(manager.all_steps())
        others = _uncommitted(path, committed)
        if not committed and not others:
            raise _not_a_checkpoint_directory(path)
        summaries = [
            StepSummary(step, name, status, _size_bytes(os.path.join(path, name)))
            for step, name, status in others
        ]
        summaries += [_summarise_step(manager, path, step) for step in committed]
    finally:
        manager.close()
    return sorted(summaries, key=lambda s: (s.step, s.status != COMPLETE, s.name))


def _summarise_step(manager: ocp.CheckpointManager, path: str, step: int) -> StepSummary:
    name = str(step)
    size = _size_bytes(os.path.join(path, name))
    try:
        meta = manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
        meta = dict(meta[META])
    except KeyError:  # no `meta` item: a plain orbax checkpoint, not nnxloop's
        meta = None
    except Exception as exc:  # orbax raises many types for damaged files
        return StepSummary(step, name, UNREADABLE, size, error=_first_line(exc))
    try:
        metrics = manager.metrics(step)
    except Exception:  # metrics are an extra; a damaged file must not hide the step
        metrics = None
    return StepSummary(step, name, COMPLETE, size, meta=meta, metrics=metrics and dict(metrics))


def best_step(summaries: list[StepSummary]) -> int | None:
    """The step `BestModelCallback` ranks best (its `meta["best"]` record), or None.

    NaN and infinite values never rank; ties go to the earlier step.
    """
    ranked = []
    for s in summaries:
        best = (s.meta or {}).get("best") if s.status == COMPLETE else None
        if best is None:
            continue
        value = float(best["value"])
        if math.isfinite(value):
            ranked.append((value if best["mode"] == "min" else -value, s.step))
    return min(ranked)[1] if ranked else None


def _describe_sharding(sharding: Any) -> str:
    if sharding is None:
        return "-"
    if isinstance(sharding, ocp.metadata.NamedShardingMetadata):
        mesh = ", ".join(
            f"{axis}={int(size)}" for axis, size in zip(sharding.axis_names, sharding.shape)
        )
        spec = tuple(sharding.partition_spec)
        if all(entry is None for entry in spec):
            return f"replicated, mesh({mesh})"
        entries = ", ".join(
            "None" if entry is None else repr(tuple(entry) if isinstance(entry, list) else entry)
            for entry in spec
        )
        return f"P({entries}), mesh({mesh})"
    if isinstance(sharding, ocp.metadata.SingleDeviceShardingMetadata):
        return f"device {sharding.device_str}"
    return repr(sharding)


def _dtype_name(dtype: Any) -> str:
    if dtype is None:
        return "-"
    try:
        return np.dtype(dtype).name
    except TypeError:
        return str(dtype)


def _array_summary(key_path: Any, leaf: Any) -> ArraySummary:
    # Array and scalar leaves carry shape, dtype and sharding; strings and others do not.
    shape = getattr(leaf, "shape", None)
    return ArraySummary(
        path=jax.tree_util.keystr(key_path),
        shape=None if shape is None else tuple(int(d) for d in shape),
        dtype=_dtype_name(getattr(leaf, "dtype", None)),
        sharding=_describe_sharding(getattr(leaf, "sharding", None)),
    )


def read_step(
    directory: str | os.PathLike, step: int
) -> tuple[dict[str, list[ArraySummary]], dict[str, Any] | None]:
    """The saved arrays' metadata and the `meta` item of one committed step.

    Only metadata files are read: no array is restored, so this works whatever devices (or
    how many) the checkpoint was written with.

    Returns:
        `({"model": [...], "optimizer": [...]}, meta)`; `meta` is None for a plain orbax
        checkpoint without nnxloop's `meta` item.

    Raises:
        CheckpointError: no such directory or step, or the step's metadata cannot be read.
    """
    path = _existing_directory(directory)
    manager = _reader(path)
    try:
        steps = sorted(manager.all_steps())
        if step not in steps:
            if not steps:
                raise _not_a_checkpoint_directory(path)
            why = "".join(
                f" ({name} is {status})"
                for s, name, status in _uncommitted(path, steps)
                if s == step
            )
            raise CheckpointError(
                f"No complete checkpoint of step {step} in {path}{why}; it has steps "
                f"{', '.join(map(str, steps))}."
            )
        try:
            items = manager.metadata(step).item_metadata
            arrays = {}
            for item in (MODEL, OPTIMIZER):
                if item not in items or items[item] is None:
                    continue
                arrays[item] = [
                    _array_summary(key_path, leaf)
                    for key_path, leaf in jax.tree_util.tree_flatten_with_path(items[item])[0]
                ]
            summary = _summarise_step(manager, path, step)
        except Exception as exc:  # orbax raises many types for damaged files
            raise CheckpointError(
                f"Checkpoint step {step} in {path} is unreadable ({_first_line(exc)})."
            ) from exc
        if summary.status == UNREADABLE:
            raise CheckpointError(
                f"Checkpoint step {step} in {path} is unreadable ({summary.error})."
            )
    finally:
        manager.close()
    return arrays, summary.meta
