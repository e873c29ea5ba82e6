"""Callbacks of our own (Lightning's are configured directly in conf/callbacks/)."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L

log = logging.getLogger(__name__)


class FinalCheckpoint(L.Callback):
    """Saves the weights training ends with, whatever ended it (``max_steps``, ``max_time``, ``max_epochs``, a stop
    asked for, Ctrl+C): the model ``asr.train`` tests, and that ``metrics.json`` names. Lightning's
    ``ModelCheckpoint`` saves only when it validates, so its ``last.ckpt`` can be older."""

    def __init__(self, dirpath: str, filename: str = "final.ckpt") -> None:
        self.path = Path(dirpath) / filename

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            self._save(trainer)

    def _save(self, trainer: L.Trainer) -> None:
        trainer.save_checkpoint(self.path)
        log.info("Final weights (step %d): %s", trainer.global_step, self.path)
