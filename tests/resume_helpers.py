"""A callback for the resume and preemption tests, loaded by ``python -m asr.train`` from the config (tests/ on
PYTHONPATH)."""

import os
import signal
from pathlib import Path

import lightning as L


class StepLog(L.Callback):
    """Appends ``<step> <epoch> <utterance ids>`` to ``<folder>/rank<r>.txt`` for each micro-batch a rank starts,
    ``<step>`` the optimizer step it belongs to (1 for the first). With ``kill_in_step``, the process sends itself
    ``signal`` in the middle of that step (after its backward, before its optimizer step), once the checkpoint of
    the step before is on disk; with ``rank``, only that rank does."""

    def __init__(
        self, folder: str, kill_in_step: int | None = None, signal: str = "SIGKILL", rank: int | None = None
    ) -> None:
        self.folder = Path(folder)
        self.kill_in_step, self.signal, self.rank = kill_in_step, signal, rank

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f"rank{trainer.global_rank}.txt", "a") as f:
            f.write(f"{trainer.global_step + 1} {trainer.current_epoch} {' '.join(batch['ids'])}\n")

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if self.rank is not None and trainer.global_rank != self.rank:
            return
        if self.kill_in_step is not None and trainer.global_step + 1 == self.kill_in_step:
            os.kill(os.getpid(), signal.Signals[self.signal])
