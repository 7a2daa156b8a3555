"""Reading a checkpoint directory without restoring arrays (for `nnxloop inspect`)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from nnxloop._rules.ranking import score
from nnxloop.checkpointing import paths
from nnxloop.checkpointing.errors import CheckpointError
from nnxloop.checkpointing.guard import META, MODEL, OPTIMIZER

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
    path = paths.checkpoint_directory(directory, what="Checkpoint directory")
    where = paths.path(path)
    if not where.exists():
        raise CheckpointError(f"Checkpoint directory {path} does not exist.")
    if not where.is_dir():
        raise CheckpointError(f"{path} is a file, not a checkpoint directory.")
    return path


def _join(path: str, name: str) -> str:
    return f"{path}/{name}" if paths.is_remote(path) else os.path.join(path, name)


def _size_bytes(path: str) -> int:
    total = 0
    kind = paths.scheme(path)
    for found, _dirs, files in paths.path(path).walk():
        root = found
        if kind is not None and not paths.is_remote(found):  # fsspec walks without the scheme
            root = paths.path(f"{kind}://{os.fspath(found).lstrip('/')}")
        for name in files:
            try:
                total += (root / name).stat().length
            except OSError:  # removed while we walk, e.g. by a running save
                pass
    return total


def _first_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _listdir(path: str) -> list[str]:
    try:
        return [entry.name for entry in paths.path(path).iterdir()]
    except OSError as exc:
        raise CheckpointError(f"{path} cannot be read ({exc.strerror or exc}).") from exc


def _is_dir(path: str) -> bool:
    try:
        return paths.path(path).is_dir()
    except OSError:
        return False


def _not_a_checkpoint_directory(path: str) -> CheckpointError:
    def holds_steps(sub: str) -> bool:
        try:
            return _is_dir(sub) and any(n.isdigit() for n in _listdir(sub))
        except CheckpointError:
            return False

    below = sorted(n for n in _listdir(path) if holds_steps(_join(path, n)))
    hint = f"; these subdirectories hold checkpoints: {', '.join(below)}" if below else ""
    return CheckpointError(
        f"{path} is not a checkpoint directory (it has no step directories){hint}."
    )


def _uncommitted(path: str, committed: list[int]) -> list[tuple[int, str, str]]:
    """`(step, name, status)` of the step directories orbax does not count as committed."""
    found = []
    for name in _listdir(path):
        if not _is_dir(_join(path, name)):
            continue
        if name.isdigit():
            if int(name) not in committed:  # orbax saw no commit marker: interrupted too
                found.append((int(name), name, INCOMPLETE))
            continue
        for pattern, status in _NOT_COMMITTED:
            if match := pattern.match(name):
                found.append((int(match.group(1)), name, status))
    return found


def list_checkpoints(directory: str | os.PathLike, *, verify: bool = False) -> list[StepSummary]:
    """Every step directory in `directory`, committed or not, by step.

    A committed step is "complete" when its `meta` item reads and every item its commit record
    names is there with its metadata (a step half deleted by orbax's background delete is not).
    No array is read unless `verify` is set: then every array of every committed step is read
    back into host memory, one item at a time, which also finds truncated or corrupted array
    files.

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
            StepSummary(step, name, status, _size_bytes(_join(path, name)))
            for step, name, status in others
        ]
        summaries += [_summarise_step(manager, path, step, verify=verify) for step in committed]
    finally:
        manager.close()
    return sorted(summaries, key=lambda s: (s.step, s.status != COMPLETE, s.name))


def _read_json(path: str) -> Any:
    return json.loads(paths.path(path).read_text())


def _missing_part(step_dir: str) -> str | None:
    """Why a committed step's files are not all there, or None.

    orbax's commit record names the step's items; each must exist, and an array item must keep
    its tree metadata and, when written as OCDBT, its manifest and data files.
    """
    try:
        items = list(_read_json(_join(step_dir, "_CHECKPOINT_METADATA")).get("item_handlers") or {})
    except (OSError, ValueError, AttributeError):
        return "its commit record (_CHECKPOINT_METADATA) is missing or damaged"
    for item in items:
        item_dir = _join(step_dir, item)
        if not _is_dir(item_dir):
            return f"the {item} item is missing"
        if item not in (MODEL, OPTIMIZER):
            continue
        try:
            ocdbt = bool(_read_json(_join(item_dir, "_METADATA")).get("use_ocdbt"))
        except (OSError, ValueError, AttributeError):
            return f"the {item} item's metadata (_METADATA) is missing or damaged"
        if ocdbt and not paths.path(_join(item_dir, "manifest.ocdbt")).is_file():
            return f"the {item} item's manifest.ocdbt is missing"
        data = _join(item_dir, "d")
        if ocdbt and not (_is_dir(data) and _listdir(data)):
            return f"the {item} item's array data (d/) is missing"
    return None


def _unreadable_arrays(step_dir: str) -> str | None:
    """Reads back every stored chunk of every array item of the step; why one does not read,
    or None.

    The reads go through tensorstore's key-value store, one chunk at a time and synchronously:
    every byte orbax wrote is read (a truncated or missing data file fails), whatever devices the
    step was written with, and memory holds one chunk at a time.
    """
    for item in (MODEL, OPTIMIZER):
        item_dir = _join(step_dir, item)
        if not _is_dir(item_dir):
            continue
        # A spec, not a file:// URL: a local path may hold '#', '%' or '?'.
        base: Any = (
            item_dir + "/"
            if paths.is_remote(item_dir)
            else {
                "driver": "file",
                "path": item_dir + os.sep,
            }
        )
        try:
            spec: Any = base
            if _uses_ocdbt(item_dir):
                spec = {"driver": "ocdbt", "base": base}
            store = ts.KvStore.open(spec).result()
            for key in store.list().result():
                store.read(key).result()
        except Exception as exc:  # tensorstore raises ValueError and others for damaged files
            return f"the {item} arrays do not read: {_first_line(exc)}"
    return None


def _uses_ocdbt(item_dir: str) -> bool:
    try:
        return bool(_read_json(_join(item_dir, "_METADATA")).get("use_ocdbt"))
    except (OSError, ValueError, AttributeError):
        return paths.path(_join(item_dir, "manifest.ocdbt")).is_file()


def _summarise_step(
    manager: ocp.CheckpointManager, path: str, step: int, *, verify: bool = False
) -> StepSummary:
    name = str(step)
    step_dir = _join(path, name)
    size = _size_bytes(step_dir)
    try:
        meta = manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
        meta = dict(meta[META])
    except KeyError:  # no `meta` item: a plain orbax checkpoint, not nnxloop's
        meta = None
    except Exception as exc:  # orbax raises many types for damaged files
        return StepSummary(step, name, UNREADABLE, size, error=_first_line(exc))
    missing = _missing_part(step_dir) or (_unreadable_arrays(step_dir) if verify else None)
    if missing is not None:
        return StepSummary(step, name, UNREADABLE, size, meta=meta, error=missing)
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
        rank = score(best["value"], best["mode"])
        if rank != -math.inf:
            ranked.append((-rank, s.step))
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
