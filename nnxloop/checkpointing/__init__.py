"""Checkpoint I/O: the one place that talks to orbax.

A checkpoint is a plain orbax `CheckpointManager` step directory with three items (four with
several processes):

- `model`: the full `nnx.state(model)` (parameters, batch statistics, RNG state), readable with
  plain orbax and `nnx.update`, no nnxloop needed;
- `optimizer`: the `nnx.Optimizer` state (step count and optax state);
- `meta`: JSON with the step, epoch, position in the epoch, data-iterator state, every
  callback's `state_dict`, a fingerprint of the state's structure and the model's array shapes;
- `data` (several processes only): each process's data-iterator state, one JSON file per
  process (`process_<i>-of-<n>.json`), as each process reads its own share of the data.

Retention, atomic commits and background writing are orbax's; this package only decides which
orbax options a directory gets and turns orbax's failures into errors that say what to do.
`store` writes and restores; `reading` lists and describes without restoring arrays; `paths`
keeps a `gs://` URL a URL (never a local folder named `gs:`).
"""

from nnxloop.checkpointing import lock, paths
from nnxloop.checkpointing.errors import CheckpointError, NonFiniteStateError
from nnxloop.checkpointing.guard import META, MODEL, OPTIMIZER
from nnxloop.checkpointing.reading import (
    COMPLETE,
    INCOMPLETE,
    UNREADABLE,
    ArraySummary,
    StepSummary,
    best_step,
    list_checkpoints,
    read_step,
)
from nnxloop.checkpointing.store import (
    CheckpointStore,
    check_directory,
    compare_shapes,
    fingerprint,
    path_shapes,
)

__all__ = [
    "COMPLETE",
    "INCOMPLETE",
    "META",
    "MODEL",
    "OPTIMIZER",
    "ArraySummary",
    "CheckpointError",
    "CheckpointStore",
    "NonFiniteStateError",
    "StepSummary",
    "UNREADABLE",
    "best_step",
    "check_directory",
    "compare_shapes",
    "fingerprint",
    "list_checkpoints",
    "lock",
    "paths",
    "path_shapes",
    "read_step",
]
