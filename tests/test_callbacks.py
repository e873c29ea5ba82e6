"""The monitoring callbacks on a toy module, in process: what they log to a plain CSV logger, and on which steps."""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader

from asr.callbacks import TrainingMonitor, ValidationSamples

SAMPLE_RATE = 16_000


class Toy(L.LightningModule):
    """A linear regression whose batches look like ours (``lengths`` in samples, ``ids``, ``texts``)."""

    def __init__(self) -> None:
        super().__init__()
        self.save_hyperparameters({"sample_rate": SAMPLE_RATE})
        self.layer = nn.Linear(8, 1)
        self.norms: dict[int, float] = {}

    def training_step(self, batch, batch_idx):
        return 100 * (self.layer(batch["x"]) - batch["y"]).square().mean()

    def on_before_optimizer_step(self, optimizer):
        # Lightning calls the callbacks' hook first, then this one, then clips.
        self.norms[self.global_step] = float(torch.nn.utils.get_total_norm([p.grad for p in self.parameters()]))

    def validation_step(self, batch, batch_idx):
        return ["A HYPOTHESIS"] * len(batch["ids"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def loader(n: int) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    batches = [
        {
            "x": torch.randn(4, 8, generator=generator),
            "y": torch.randn(4, 1, generator=generator),
            "lengths": torch.full((4,), SAMPLE_RATE // 2),  # 2 s of audio per batch
            "ids": [f"u{k}" for k in range(4)],
            "texts": ["A REFERENCE"] * 4,
        }
        for _ in range(n)
    ]
    return DataLoader(batches, batch_size=None)


def fit(tmp_path, callbacks, logger, steps=6, **kwargs) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        log_every_n_steps=2,
        gradient_clip_val=1e-3,  # far below the norms: a norm read after clipping would be 1e-3
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )
    trainer.fit(Toy(), train_dataloaders=loader(steps), val_dataloaders=loader(1))
    return trainer


def csv_rows(logger: CSVLogger) -> list[dict]:
    with open(f"{logger.log_dir}/metrics.csv") as file:
        return list(csv.DictReader(file))


def test_grad_norm_before_clipping_throughput_on_logging_steps_only(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    trainer = fit(tmp_path, [TrainingMonitor()], logger)
    rows = [row for row in csv_rows(logger) if row.get("train/grad_norm")]
    assert [int(row["step"]) for row in rows] == [1, 3, 5]  # the steps Lightning writes, every 2
    norms = trainer.lightning_module.norms
    for row in rows:
        assert float(row["train/grad_norm"]) == pytest.approx(norms[int(row["step"])], rel=1e-5)
        assert float(row["train/grad_norm"]) > 1e-2
        assert float(row["train/audio_seconds_per_second"]) > 0
    assert "train/peak_gpu_memory_gib" not in rows[0]  # CUDA only


def test_without_a_logger_or_wandb_the_callbacks_do_no_harm(tmp_path):
    samples = ValidationSamples(per_split=2)
    fit(tmp_path, [TrainingMonitor(), samples], logger=False, val_check_interval=2, check_val_every_n_epoch=None)
    assert samples.rows == []  # only collected for W&B
    logger = CSVLogger(tmp_path, name="csv")
    fit(tmp_path, [TrainingMonitor(), samples], logger, val_check_interval=2, check_val_every_n_epoch=None)
    assert samples.rows == []
    assert not any(key.startswith("val/predictions") for row in csv_rows(logger) for key in row)


def test_with_gradient_accumulation_one_write_per_logging_step(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    trainer = fit(tmp_path, [TrainingMonitor()], logger, steps=4, accumulate_grad_batches=2)
    rows = [row for row in csv_rows(logger) if row.get("train/grad_norm")]
    assert [int(row["step"]) for row in rows] == [1, 3]
    for row in rows:
        assert float(row["train/grad_norm"]) == pytest.approx(
            trainer.lightning_module.norms[int(row["step"])], rel=1e-5
        )


def test_under_fp16_with_a_fused_optimizer_the_norm_is_unscaled(tmp_path):
    """A fused optimizer unscales inside its step, so the gradients the hook sees are still scaled."""

    class FusedToy(Toy):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3, fused=True)

        def on_before_optimizer_step(self, optimizer):
            scale = self.trainer.precision_plugin.scaler.get_scale()
            self.norms[self.global_step] = float(torch.nn.utils.get_total_norm([p.grad for p in self.parameters()]))
            self.norms[self.global_step] /= scale

    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)  # Lightning makes a scaler on CUDA only
    logger = CSVLogger(tmp_path, name="csv")
    trainer = L.Trainer(
        accelerator="cpu",
        plugins=[L.pytorch.plugins.MixedPrecision("16-mixed", "cpu", scaler=scaler)],
        max_steps=4,
        log_every_n_steps=2,
        logger=logger,
        callbacks=[TrainingMonitor()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = FusedToy()
    trainer.fit(module, train_dataloaders=loader(4))
    rows = [row for row in csv_rows(logger) if row.get("train/grad_norm")]
    assert len(rows) == 2
    for row in rows:
        assert 0 < float(row["train/grad_norm"]) < float("inf")  # no overflow step: a real comparison
        assert float(row["train/grad_norm"]) == pytest.approx(module.norms[int(row["step"])], rel=1e-4)
