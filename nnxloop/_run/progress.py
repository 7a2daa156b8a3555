"""When a progress bar is shown, and the transient bar of an evaluation."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

import jax
from tqdm.auto import tqdm


def wanted(progress: bool | None) -> bool:
    """A bar is shown when asked for, or by default when stderr is a terminal; only on
    process 0."""
    if jax.process_index() != 0:
        return False
    if progress is None:
        return sys.stderr.isatty()
    return bool(progress)


def evaluation_progress(batches: Iterable[Any], enabled: bool, name: str = "") -> Iterable[Any]:
    """Wraps evaluation batches in a transient bar of their own (named after the set)."""
    if not enabled:
        return batches
    total = len(batches) if hasattr(batches, "__len__") else None
    desc = f"evaluating {name}" if name else "evaluating"
    return tqdm(batches, total=total, desc=desc, leave=False, unit="batch")
