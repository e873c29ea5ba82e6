"""Callbacks of our own (Lightning's are configured directly in conf/callbacks/)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from torchmetrics.functional.text import char_error_rate, word_error_rate

log = logging.getLogger(__name__)

# FinalCheckpoint's file: also written on Ctrl+C, in the middle of a step, so not a point to resume from.
FINAL_CHECKPOINT = "final.ckpt"


class FinalCheckpoint(L.Callback):
    """Saves the weights training ends with, whatever ended it (``max_steps``, ``max_time``, ``max_epochs``, a stop
    asked for, Ctrl+C): the model ``asr.train`` tests, and that ``metrics.json`` names. Lightning's
    ``ModelCheckpoint`` saves only when it validates, so its ``last.ckpt`` can be older."""

    def __init__(self, dirpath: str, filename: str = FINAL_CHECKPOINT) -> None:
        self.path = Path(dirpath) / filename

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            self._save(trainer)

    def _save(self, trainer: L.Trainer) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)  # everything, to resume
        log.info("Final weights (step %d): %s", trainer.global_step, self.path)


def writes_logs(trainer: L.Trainer) -> bool:
    """Whether Lightning writes this training step's logged values to the loggers: every
    ``trainer.log_every_n_steps`` optimizer steps (and at the last), as the model's sync-free logging assumes."""
    if trainer.fast_dev_run:
        return True
    return bool(trainer._logger_connector.should_update_logs)


class TrainingMonitor(L.Callback):
    """Logs, on the steps Lightning writes to the loggers only (:func:`writes_logs`), to whatever loggers there are:

    - ``train/grad_norm``: the total L2 norm of the gradients before clipping (unscaled under fp16);
    - ``train/audio_seconds_per_second``: seconds of training audio per second of training (validation excluded)
      since the previous write, all ranks together;
    - ``train/peak_gpu_memory_gib``: the peak memory allocated on a GPU so far, the largest of the ranks (CUDA only).

    Between writes nothing is read back from the device: the audio seconds add up on the device, and the norm is
    computed on logging steps only. A logging step reads them back once, when Lightning writes.
    """

    def __init__(self, grad_norm: bool = True, throughput: bool = True, memory: bool = True) -> None:
        self.grad_norm, self.throughput, self.memory = grad_norm, throughput, memory
        self._samples: torch.Tensor | float = 0.0
        self._elapsed = 0.0
        self._since: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._samples, self._elapsed, self._since = 0.0, 0.0, time.perf_counter()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._since is not None:  # validation time is not training time
            self._elapsed += time.perf_counter() - self._since
            self._since = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit":  # not after a sanity check (training restarts the clock) or a validate()
            self._since = time.perf_counter()

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        # Lightning calls this after unscaling the gradients (AMP) and before clipping them.
        if not self.grad_norm or not writes_logs(trainer):
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        norm = torch.nn.utils.get_total_norm([g.detach() for g in grads], norm_type=2.0)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            norm = norm / scaler.get_scale()  # a fused optimizer unscales inside its step: these are still scaled
        pl_module.log("train/grad_norm", norm.float(), on_step=True, on_epoch=False, batch_size=1)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        lengths = batch.get("lengths") if isinstance(batch, dict) else None
        if self.throughput and lengths is not None:
            samples = lengths.sum() if torch.is_tensor(lengths) else float(sum(lengths))
            self._samples = self._samples + samples  # on the device: no wait
        if getattr(trainer.fit_loop, "_should_accumulate", lambda: False)() or not writes_logs(trainer):
            return
        if self.throughput and self._since is not None:
            seconds = float(self._samples) / pl_module.hparams.get("sample_rate", 16_000)  # the one read-back
            now = time.perf_counter()
            elapsed = self._elapsed + now - self._since
            self._samples, self._elapsed, self._since = 0.0, 0.0, now
            if elapsed > 0:
                self._log(trainer, pl_module, "train/audio_seconds_per_second", seconds / elapsed, "sum")
        if self.memory and pl_module.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
            self._log(trainer, pl_module, "train/peak_gpu_memory_gib", peak, "max")

    @staticmethod
    def _log(trainer: L.Trainer, pl_module: L.LightningModule, name: str, value: float, reduce_fx: str) -> None:
        """A host value; with several ranks, their sum (throughput) or max (memory), one collective per write."""
        distributed = trainer.world_size > 1
        tensor = torch.tensor(value, device=pl_module.device if distributed else "cpu")
        pl_module.log(
            name, tensor, on_step=True, on_epoch=False, batch_size=1, sync_dist=distributed, reduce_fx=reduce_fx
        )


class ValidationSamples(L.Callback):
    """A W&B table ``val/predictions`` at each validation: the first ``per_split`` utterances of each validation
    split, their reference and the model's hypothesis (what ``validation_step`` returns), with their WER and CER.
    Only W&B has tables: with no W&B logger nothing is collected."""

    COLUMNS = ["step", "split", "id", "reference", "hypothesis", "wer", "cer"]

    def __init__(self, per_split: int = 4, key: str = "val/predictions") -> None:
        self.per_split, self.key = per_split, key
        self.rows: list[list] = []
        self._taken: dict[str, int] = {}
        self._warned = False

    def _active(self, trainer: L.Trainer) -> bool:
        return self.per_split > 0 and not trainer.sanity_checking and trainer.is_global_zero and bool(_wandb(trainer))

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.rows, self._taken = [], {}

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if not self._active(trainer):
            return
        splits = getattr(pl_module, "splits", {}).get("val") or []
        split = splits[dataloader_idx] if dataloader_idx < len(splits) else str(dataloader_idx)
        wanted = self.per_split - self._taken.get(split, 0)
        if wanted <= 0:
            return
        if not isinstance(outputs, (list, tuple)):
            if not self._warned:
                log.warning("validation_step returns no transcripts: no table of predictions")
                self._warned = True
            return
        for id_, reference, hypothesis in list(zip(batch["ids"], batch["texts"], outputs, strict=False))[:wanted]:
            wer = float(word_error_rate(hypothesis, reference)) if reference.strip() else None
            cer = float(char_error_rate(hypothesis, reference)) if reference.strip() else None
            self.rows.append([trainer.global_step, split, id_, reference, hypothesis, wer, cer])
            self._taken[split] = self._taken.get(split, 0) + 1

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active(trainer) or not self.rows:
            return
        # At the x-axis value Lightning gives this validation's metrics.
        step = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)
        for logger in _wandb(trainer):
            logger.log_table(key=self.key, columns=self.COLUMNS, data=self.rows, step=step)


def _wandb(trainer: L.Trainer) -> list[WandbLogger]:
    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
