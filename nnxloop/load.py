"""`load_model`: a trained model from a checkpoint directory, for inference."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from nnxloop._rules.tree_paths import key_parts
from nnxloop.checkpointing import (
    OPTIMIZER,
    CheckpointError,
    CheckpointStore,
    best_step,
    compare_shapes,
    list_checkpoints,
    path_shapes,
    paths,
)

log = logging.getLogger("nnxloop")

_SHOWN = 20  # skipped arrays named one per line by load_model(strict=False)


def _resolve_step(store: CheckpointStore, step: int | str) -> int:
    steps = store.steps()
    if not steps:
        raise CheckpointError(
            f"No checkpoints in {store.directory}; pass the directory a CheckpointCallback or "
            "BestModelCallback wrote to."
        )
    if step == "latest":
        return steps[-1]
    if step == "best":
        chosen = best_step(list_checkpoints(store.directory))
        if chosen is None:
            raise CheckpointError(
                f"{store.directory} holds no checkpoint ranked by a BestModelCallback (with a "
                "finite metric); use step='latest' or a step number."
            )
        return chosen
    if isinstance(step, int) and not isinstance(step, bool):
        if step not in steps:
            raise CheckpointError(
                f"No checkpoint of step {step} in {store.directory}; it has steps {steps}."
            )
        return step
    raise ValueError(f"step must be 'latest', 'best' or an int, got {step!r}.")


def _read_model_state(store: CheckpointStore, step: int, abstract_state: Any) -> Any:
    """The model state of `step`, on one device, after checking its meta and shapes."""
    meta = store.read_meta(step)
    if meta.get("step", step) != step:
        raise ValueError(f"its meta says step {meta.get('step')!r}, its directory says {step}")
    try:
        compare_shapes(
            meta.get("model_shapes", {}),
            path_shapes(abstract_state),
            where=f"The checkpoint of step {step} in {store.directory}",
        )
    except CheckpointError as exc:
        raise CheckpointError(
            f"{exc} To load only the arrays that match (fine-tuning with a new head, say), "
            "pass strict=False."
        ) from None
    replicated = NamedSharding(
        jax.make_mesh((1,), ("data",), devices=jax.devices()[:1]), PartitionSpec()
    )
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract_state
    )
    state, _ = store.restore(step, target)
    return state


def _is_key(x: Any) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _matching_state(
    store: CheckpointStore, step: int, model: nnx.Module
) -> tuple[Any, list[tuple[str, str]]]:
    """The model's state with every leaf whose path and shape the checkpoint of `step` has
    replaced by the saved value; and `(path, why)` for each leaf skipped either way."""
    meta = store.read_meta(step)
    if meta.get("step", step) != step:
        raise ValueError(f"its meta says step {meta.get('step')!r}, its directory says {step}")
    saved_tree = store.restore_as_saved(step, _one_device())
    saved = {
        key_parts(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(saved_tree)[0]
    }
    state = nnx.state(model)
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    leaves, skipped, used = [], [], set()
    for path, leaf in flat:
        name, parts = jax.tree_util.keystr(path), key_parts(path)
        value = saved.get(parts)
        if value is not None and _is_key(leaf) and value.dtype == jnp.uint32:
            value = jax.random.wrap_key_data(value, impl=jax.random.key_impl(leaf))
        if value is None:
            skipped.append((name, "not in the checkpoint; kept as built"))
        elif value.shape != leaf.shape:
            skipped.append(
                (
                    name,
                    f"shape {tuple(value.shape)} in the checkpoint, {tuple(leaf.shape)} in the "
                    "model; kept as built",
                )
            )
            used.add(parts)
        else:
            used.add(parts)
            leaves.append(value.astype(leaf.dtype) if not _is_key(leaf) else value)
            continue
        leaves.append(jax.device_put(leaf, _one_device()))
    only_saved = [parts for parts in saved if parts not in used]
    if len(skipped) == len(flat):  # nothing of the model was loaded
        raise CheckpointError(
            f"No array of the checkpoint of step {step} in {store.directory} matches the "
            "model by path and shape: it was written by another kind of model."
        )
    skipped += [("/".join(parts), "in the checkpoint only; not loaded") for parts in only_saved]
    return jax.tree_util.tree_unflatten(treedef, leaves), skipped


def _with_averages(store: CheckpointStore, step: int, state: Any, kept: set[str]) -> Any:
    """`state` (a model state loaded from `step`) with each parameter it loaded replaced by
    its moving average, which the optimizer item of a run trained with `ema_decay` holds;
    the leaves named in `kept` (kept as built by `strict=False`) stay as they are."""
    optimizer = store.restore_as_saved(step, _one_device(), item=OPTIMIZER)
    averages = optimizer.get("ema", {}).get("params") if isinstance(optimizer, dict) else None
    if not averages:
        raise CheckpointError(
            f"The checkpoint of step {step} in {store.directory} holds no moving average of "
            "the weights (its run was trained without Trainer(ema_decay=...)); load it with "
            'weights="model".'
        )
    saved = {key_parts(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(averages)[0]}
    param_paths = {
        key_parts(p)
        for p, _ in jax.tree_util.tree_flatten_with_path(nnx.state(state, nnx.Param))[0]
    }
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    leaves, missing = [], []
    for path, leaf in flat:
        parts = key_parts(path)
        if parts in param_paths and jax.tree_util.keystr(path) not in kept:
            value = saved.get(parts)
            if value is None or value.shape != leaf.shape:
                missing.append(jax.tree_util.keystr(path))
            else:
                leaf = value.astype(leaf.dtype)
        leaves.append(leaf)
    if missing:
        raise CheckpointError(
            f"The moving average in the checkpoint of step {step} in {store.directory} has no "
            f"average of the shape of {missing[0]} (and {len(missing) - 1} more parameters) "
            "although the checkpoint has the parameter: it was not written by nnxloop's "
            'ema_decay. Load it with weights="model".'
        )
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _one_device() -> NamedSharding:
    return NamedSharding(jax.make_mesh((1,), ("data",), devices=jax.devices()[:1]), PartitionSpec())


def load_model(
    directory: str | os.PathLike,
    like: nnx.Module | Callable[[], nnx.Module],
    *,
    step: int | str = "latest",
    strict: bool = True,
    weights: str = "model",
) -> nnx.Module:
    """Loads a model's saved state (parameters, batch statistics, RNG state) for inference or
    for fine-tuning.

    Args:
        directory: a directory written by `CheckpointCallback` or `BestModelCallback`, or a
            `gs://` URL of one.
        like: a model of the same architecture (its values are replaced), or a function that
            builds one (called abstractly when `strict`: no initialisation cost).
        step: `"latest"`, `"best"` (a `BestModelCallback` directory) or a step number.
        strict: with False, loads every array whose path and shape match the checkpoint and
            keeps the rest as built (a new head, a resized layer), then logs one warning
            naming each array it skipped and why (not in the checkpoint, another shape, or
            in the checkpoint only). Raises only when no array matches at all.
        weights: `"model"` loads the parameters as trained; `"ema"` loads their
            exponential moving average instead (a run trained with `Trainer(ema_decay=...)`),
            the rest of the state (batch statistics, RNG state) as saved.

    Returns:
        The model, holding the saved values, in eval mode.

    Raises:
        CheckpointError: no checkpoints, no such step, a model whose shapes differ (the
            message names the leaf and both shapes; `strict=False` loads what matches), or a
            damaged step. With `step="latest"`, a damaged newest step is skipped with a
            warning and the one before it is loaded.

    Example:
        ```python
        model = nl.load_model("runs/exp/best", lambda: MyModel(rngs=nnx.Rngs(0)), step="best")
        ```
    """
    if weights not in ("model", "ema"):
        raise ValueError(f'weights must be "model" or "ema", got {weights!r}.')
    directory = paths.checkpoint_directory(directory, what="Checkpoint directory")
    if not paths.path(directory).is_dir():
        raise CheckpointError(f"Checkpoint directory {directory} does not exist.")
    if isinstance(like, nnx.Module):
        model = like
        abstract_model = nnx.eval_shape(lambda: like)
    elif callable(like):
        # Leaves that are not loaded keep their initial values, so strict=False builds them.
        model = None if strict else like()
        abstract_model = nnx.eval_shape(like) if strict else nnx.eval_shape(lambda: model)
    else:
        raise TypeError(
            f"like must be an nnx.Module or a function building one, got {type(like).__name__}."
        )
    store = CheckpointStore(directory)
    graphdef, abstract_state = nnx.split(abstract_model)
    try:
        chosen = _resolve_step(store, step)
        # "latest" falls back over damaged steps, as resuming does (but moves nothing aside:
        # loading only reads); a step asked for by number or as "best" is that step or an error.
        candidates = [s for s in reversed(store.steps()) if s <= chosen]
        if step != "latest":
            candidates = [chosen]
        state = None
        skipped: list[tuple[str, str]] = []
        for candidate in candidates:
            try:
                if strict:
                    state = _read_model_state(store, candidate, abstract_state)
                else:
                    assert model is not None
                    state, skipped = _matching_state(store, candidate, model)
                if weights == "ema":
                    kept = {name for name, _ in skipped}  # as built: no average wanted
                    state = _with_averages(store, candidate, state, kept)
                chosen = candidate
                break
            except CheckpointError:
                raise  # not damage: another model, another step
            except Exception as exc:  # orbax raises many types for damaged files
                where = f"The checkpoint of step {candidate} in {directory}"
                why = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
                if step != "latest":
                    raise CheckpointError(
                        f"{where} cannot be read ({why}); it is damaged. Load another step "
                        f"(`nnxloop inspect {directory}` lists them)."
                    ) from exc
                log.warning("%s cannot be read (%s); loading the one before.", where, why)
        if state is None:
            raise CheckpointError(
                f"No checkpoint in {directory} can be read (steps {candidates}, newest first, "
                "were tried; the warnings above say why)."
            )
    finally:
        store.close()
    if skipped:
        shown = "".join(f"\n  {path}: {why}" for path, why in skipped[:_SHOWN])
        more = f"\n  ... and {len(skipped) - _SHOWN} more" if len(skipped) > _SHOWN else ""
        log.warning(
            "load_model(strict=False) loaded step %d of %s except %d arrays:%s%s",
            chosen,
            directory,
            len(skipped),
            shown,
            more,
        )
    if model is None:
        model = nnx.merge(graphdef, state)
    else:
        nnx.update(model, state)
    model.eval()
    return model
