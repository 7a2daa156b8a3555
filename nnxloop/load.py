"""`load_model`: a trained model from a checkpoint directory, for inference."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from nnxloop.checkpointing import (
    CheckpointError,
    CheckpointStore,
    best_step,
    compare_shapes,
    list_checkpoints,
    path_shapes,
    paths,
)

log = logging.getLogger("nnxloop")


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
    compare_shapes(
        meta.get("model_shapes", {}),
        path_shapes(abstract_state),
        where=f"The checkpoint of step {step} in {store.directory}",
    )
    replicated = NamedSharding(
        jax.make_mesh((1,), ("data",), devices=jax.devices()[:1]), PartitionSpec()
    )
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract_state
    )
    state, _ = store.restore(step, target)
    return state


def load_model(
    directory: str | os.PathLike,
    like: nnx.Module | Callable[[], nnx.Module],
    *,
    step: int | str = "latest",
) -> nnx.Module:
    """Loads a model's saved state (parameters, batch statistics, RNG state) for inference.

    Args:
        directory: a directory written by `CheckpointCallback` or `BestModelCallback`.
        like: a model of the same architecture (its values are replaced), or a function that
            builds one (called abstractly: no initialisation cost).
        step: `"latest"`, `"best"` (a `BestModelCallback` directory) or a step number.

    Returns:
        The model, holding the saved values, in eval mode.

    Raises:
        CheckpointError: no checkpoints, no such step, a model whose shapes differ (the
            message names the leaf and both shapes), or a damaged step. With
            `step="latest"`, a damaged newest step is skipped with a warning and the one
            before it is loaded.

    Example:
        ```python
        model = nl.load_model("runs/exp/best", lambda: MyModel(rngs=nnx.Rngs(0)), step="best")
        ```
    """
    directory = paths.checkpoint_directory(directory, what="Checkpoint directory")
    if not paths.path(directory).is_dir():
        raise CheckpointError(f"Checkpoint directory {directory} does not exist.")
    if isinstance(like, nnx.Module):
        model = like
        abstract_model = nnx.eval_shape(lambda: like)
    elif callable(like):
        abstract_model = nnx.eval_shape(like)
        model = None
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
        for candidate in candidates:
            try:
                state = _read_model_state(store, candidate, abstract_state)
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
    if model is None:
        model = nnx.merge(graphdef, state)
    else:
        nnx.update(model, state)
    model.eval()
    return model
