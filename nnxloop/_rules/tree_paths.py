"""Naming a leaf of a pytree by its path, whatever kind of keys the path holds."""

from __future__ import annotations

from typing import Any


def key_parts(path: Any) -> tuple[str, ...]:
    """A leaf path with every key as a string.

    The model's state tree and the tree orbax saved it as name the same leaf differently
    (`['layers'][0]['kernel'].value` and `layers/'0'/kernel/value`); as `("layers", "0",
    "kernel", "value")` they compare equal.
    """
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return tuple(parts)
