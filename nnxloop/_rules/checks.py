"""Argument checks shared by the trainer and the callbacks: one rule, one wording."""

from __future__ import annotations

from typing import Any


def positive_int(name: str, value: Any, *, optional: bool = False) -> None:
    """Raises a `ValueError` naming `name` unless `value` is an int >= 1 (or None, when
    `optional`). bools are refused: `True` is an int to Python, never a count to a user."""
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        allowed = "a positive int or None" if optional else "a positive int"
        raise ValueError(f"{name} must be {allowed}, got {value!r}.")
