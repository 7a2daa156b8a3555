"""Triggers decide *when*: every N steps, every N epochs, every N seconds of training."""

from __future__ import annotations

import dataclasses
import time

from nnxloop._rules.checks import positive_int


def next_multiple(step: int, n: int) -> int:
    """The first multiple of `n` after `step` (the next step an every-`n` schedule acts on)."""
    return step + n - step % n


def _check_positive_secs(value: float | None) -> None:
    if value is None:
        return
    if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"every_secs must be a positive number of seconds, got {value!r}.")


@dataclasses.dataclass
class Trigger:
    """Fires every `every_steps` steps, at the end of every `every_epochs` epochs, and/or once
    `every_secs` seconds have passed since it last fired.

    Step triggers land on exactly their step (they shorten a multi-step dispatch); the time
    trigger fires at the first dispatch boundary after its interval, so it never changes how
    steps are grouped.
    """

    every_steps: int | None = None
    every_epochs: int | None = None
    every_secs: float | None = None
    _last_fired: float = dataclasses.field(default_factory=time.monotonic, repr=False)

    def __post_init__(self) -> None:
        positive_int("every_steps", self.every_steps, optional=True)
        positive_int("every_epochs", self.every_epochs, optional=True)
        _check_positive_secs(self.every_secs)

    def next_step(self, step: int) -> int | None:
        """The next step after `step` on which the step trigger fires."""
        if self.every_steps is None:
            return None
        return next_multiple(step, self.every_steps)

    def step_due(self, step: int, *, at_boundary: bool) -> bool:
        if self.every_steps is not None and step % self.every_steps == 0:
            return True
        return (
            at_boundary
            and self.every_secs is not None
            and time.monotonic() - self._last_fired >= self.every_secs
        )

    def epoch_due(self, epochs_done: int) -> bool:
        return self.every_epochs is not None and epochs_done % self.every_epochs == 0

    def fired(self) -> None:
        """Restarts the time interval (call after acting on the trigger)."""
        self._last_fired = time.monotonic()
