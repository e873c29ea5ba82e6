"""Learning-rate schedules, built by the LightningModule once the number of optimizer steps is known."""

from __future__ import annotations

import math
from collections.abc import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def tri_stage(
    optimizer: Optimizer,
    total_steps: int,
    warmup_steps: int,
    hold_fraction: float = 0.0,
    final_lr_scale: float = 0.0,
    decay: str = "linear",
    time_fraction: Callable[[], float] | None = None,
) -> LambdaLR:
    """Linear warm-up, a hold at the peak for ``hold_fraction`` of all steps, then decay to ``final_lr_scale``.

    With ``hold_fraction=0``, ``decay="linear"`` and ``final_lr_scale=0`` this is transformers'
    ``get_linear_schedule_with_warmup``; ``decay="exponential"`` gives fairseq's tri-stage schedule.

    ``time_fraction`` (the share of a time budget used so far) makes the schedule follow whichever runs out first,
    steps or time, so a run stopped by ``trainer.max_time`` still ends with its decay done.
    """
    if decay not in ("linear", "exponential"):
        raise ValueError(f"decay must be 'linear' or 'exponential', not {decay!r}")
    if decay == "exponential" and final_lr_scale <= 0:
        raise ValueError("exponential decay needs final_lr_scale > 0")
    hold_end = warmup_steps + int(hold_fraction * total_steps)
    decay_steps = max(1, total_steps - hold_end)

    def scale(step: int) -> float:
        if time_fraction is not None:
            step = max(step, int(time_fraction() * total_steps))
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if step < hold_end:
            return 1.0
        progress = min(1.0, (step - hold_end) / decay_steps)
        if decay == "linear":
            return 1.0 - (1.0 - final_lr_scale) * progress
        return math.exp(math.log(final_lr_scale) * progress)

    return LambdaLR(optimizer, scale)
