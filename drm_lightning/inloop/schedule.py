"""When to merge and when to snapshot: counted schedules with resumable counters."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Predicate = Callable[[int | None, int | None], bool]


def check_every(name: str, value: int | None) -> None:
    """Raise ``ValueError`` unless ``value`` is ``None`` or a positive integer."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")


class Schedule:
    """Acts after every n-th optimizer step and/or epoch, each step or epoch at most once.

    ``due(step=..., epoch=...)`` takes the number of optimizer steps done so far (Lightning's
    ``global_step``) or the index of the epoch that just ended, asks ``predicate`` (default:
    :meth:`fires`) with the zero-based step index or the epoch index, and remembers where it
    last acted, so that gradient accumulation (several batches, one optimizer step) acts once
    and a resumed run does not act twice. Like ``WeightAveraging``, the counters start at 0
    and -1 so that the first step or epoch may already act.

    Args:
        every_n_steps: Act after every n-th optimizer step (counted from one).
        every_n_epochs: Act after every n-th epoch (counted from one).

    Example:
        >>> s = Schedule(every_n_steps=2)
        >>> [step for step in (1, 2, 2, 3, 4) if s.due(step=step)]
        [2, 4]
        >>> s.state_dict()
        {'latest_step': 4, 'latest_epoch': -1}
    """

    def __init__(self, every_n_steps: int | None = None, every_n_epochs: int | None = None) -> None:
        check_every("every_n_steps", every_n_steps)
        check_every("every_n_epochs", every_n_epochs)
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.latest_step = 0
        self.latest_epoch = -1

    @property
    def empty(self) -> bool:
        """Neither a step nor an epoch period is set."""
        return self.every_n_steps is None and self.every_n_epochs is None

    def fires(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """Whether the period matches zero-based ``step_idx`` or ``epoch_idx``."""
        if step_idx is not None and self.every_n_steps:
            return (step_idx + 1) % self.every_n_steps == 0
        if epoch_idx is not None and self.every_n_epochs:
            return (epoch_idx + 1) % self.every_n_epochs == 0
        return False

    def due(
        self,
        *,
        step: int | None = None,
        epoch: int | None = None,
        predicate: Predicate | None = None,
    ) -> bool:
        """Whether to act now; records the step or epoch when it says yes."""
        ask = predicate or self.fires
        if step is not None:
            if step > self.latest_step and ask(step - 1, None):
                self.latest_step = step
                return True
            return False
        if epoch is not None and epoch > self.latest_epoch and ask(None, epoch):
            self.latest_epoch = epoch
            return True
        return False

    def never_fires(self, total_steps: float | None, max_epochs: int | None) -> str | None:
        """Why the period cannot fire within ``total_steps`` / ``max_epochs``, or ``None``."""
        if self.empty:
            return "no schedule (every_n_steps=None, every_n_epochs=None)"
        limits: list[str] = []
        if self.every_n_steps is not None:
            if total_steps is None or total_steps >= self.every_n_steps:
                return None
            limits.append(
                f"every_n_steps={self.every_n_steps} > {int(total_steps)} optimizer steps"
            )
        if self.every_n_epochs is not None:
            if max_epochs is None or max_epochs < 0 or max_epochs >= self.every_n_epochs:
                return None
            limits.append(f"every_n_epochs={self.every_n_epochs} > max_epochs={max_epochs}")
        return " and ".join(limits)

    def state_dict(self) -> dict[str, Any]:
        """The counters."""
        return {"latest_step": self.latest_step, "latest_epoch": self.latest_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the counters of :meth:`state_dict`."""
        self.latest_step = int(state["latest_step"])
        self.latest_epoch = int(state["latest_epoch"])
