"""A callback for the DDP test, loaded by ``python -m asr.train`` from the config (tests/ on PYTHONPATH)."""

from pathlib import Path

import lightning as L


class TrainedIds(L.Callback):
    """Appends the utterance ids of each training batch a rank gets to ``<folder>/rank<r>.txt``, a line a batch."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, batch_idx: int
    ) -> None:
        with open(self.folder / f"rank{trainer.global_rank}.txt", "a") as f:
            f.write(" ".join(batch["ids"]) + "\n")
