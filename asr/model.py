"""The LightningModule: a transformers CTC model (HuBERT, wav2vec 2.0, WavLM, ...) with greedy decoding and WER."""

from __future__ import annotations

import logging
from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.text import CharErrorRate, WordErrorRate
from transformers import AutoConfig, AutoModelForCTC, PreTrainedModel

from asr.data.librispeech import SAMPLE_RATE
from asr.data.text import CharTokenizer

log = logging.getLogger(__name__)


def build_backbone(pretrained: str | None, config: dict, tokenizer: CharTokenizer) -> PreTrainedModel:
    """Load ``pretrained`` (hub id or local folder) with ``config`` as overrides, or random-init from ``config``.

    The CTC head is sized from the tokenizer, and its blank is the tokenizer's pad id.
    """
    config = dict(config)
    model_type = config.pop("model_type", None)
    ctc = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_id}
    if pretrained:
        return AutoModelForCTC.from_pretrained(pretrained, **config, **ctc)
    if model_type is None:
        raise ValueError("model.config.model_type is required when model.pretrained is null")
    return AutoModelForCTC.from_config(AutoConfig.for_model(model_type, **config, **ctc))


class SpeechRecognizer(L.LightningModule):
    def __init__(
        self,
        tokenizer: CharTokenizer,
        optimizer: Callable[..., torch.optim.Optimizer],
        pretrained: str | None = None,
        config: dict | None = None,
        freeze_feature_encoder: bool = True,
        freeze_feature_encoder_after: int | None = None,
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        val_splits: tuple[str, ...] = ("dev",),
        test_splits: tuple[str, ...] = ("test",),
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer", "optimizer", "scheduler"])
        self.tokenizer = tokenizer
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.backbone = build_backbone(pretrained, config or {}, tokenizer)
        self.feature_encoder_frozen = False
        if freeze_feature_encoder:
            self._freeze_feature_encoder()
        self.splits = {"val": list(val_splits), "test": list(test_splits)}
        self.metrics = nn.ModuleDict(
            {
                f"{stage}_{split}_{name}": metric()
                for stage, splits in self.splits.items()
                for split in splits
                for name, metric in (("wer", WordErrorRate), ("cer", CharErrorRate))
            }
        )

    def _freeze_feature_encoder(self) -> None:
        self.backbone.freeze_feature_encoder()
        self.feature_encoder_frozen = True

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        # Training the convolutional feature encoder only for the first steps of a from-scratch run keeps
        # most of the benefit and drops its backward pass, the costliest part of a step on CPU, afterwards.
        after = self.hparams.freeze_feature_encoder_after
        if after is not None and not self.feature_encoder_frozen and self.global_step >= after:
            self._freeze_feature_encoder()
            log.info("Feature encoder frozen at step %d", self.global_step)

    def forward(self, input_values: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (batch, frames, vocab) and the number of valid frames of each utterance."""
        logits = self.backbone(input_values, attention_mask=attention_mask).logits
        lengths = self.backbone._get_feat_extract_output_lengths(attention_mask.sum(-1))
        return logits, lengths

    def ctc_loss(self, logits: torch.Tensor, lengths: torch.Tensor, batch: dict) -> torch.Tensor:
        """CTC summed over the batch, divided by its number of target tokens."""
        log_probs = logits.float().log_softmax(-1).transpose(0, 1)
        targets = batch["labels"].clamp(min=0)
        loss = F.ctc_loss(
            log_probs, targets, lengths, batch["label_lengths"],
            blank=self.tokenizer.pad_id, reduction="sum", zero_infinity=True,
        )
        return loss / batch["label_lengths"].sum()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits, lengths = self(batch["input_values"], batch["attention_mask"])
        loss = self.ctc_loss(logits, lengths, batch)
        batch_size = len(batch["ids"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=batch_size)
        # Utterances with more labels than frames give an infinite CTC loss, zeroed above; count them.
        too_short = (lengths < batch["label_lengths"]).sum().float()
        self.log("train/infeasible_utterances", too_short, on_step=False, on_epoch=True, reduce_fx="sum")
        self.log("train/audio_seconds", batch["attention_mask"].sum().float() / SAMPLE_RATE,
                 on_step=False, on_epoch=True, reduce_fx="sum")
        return loss

    def _evaluate(self, stage: str, batch: dict, batch_idx: int, dataloader_idx: int) -> None:
        split = self.splits[stage][dataloader_idx]
        logits, lengths = self(batch["input_values"], batch["attention_mask"])
        loss = self.ctc_loss(logits, lengths, batch)
        self.log(f"{stage}/{split}/loss", loss, batch_size=len(batch["ids"]), add_dataloader_idx=False,
                 sync_dist=True)
        hypotheses = self.tokenizer.batch_ctc_decode(logits, lengths)
        self.metrics[f"{stage}_{split}_wer"].update(hypotheses, batch["texts"])
        self.metrics[f"{stage}_{split}_cer"].update(hypotheses, batch["texts"])
        if batch_idx == 0:
            log.info("%s/%s example\n  ref: %s\n  hyp: %s", stage, split, batch["texts"][0], hypotheses[0])

    def _log_error_rates(self, stage: str) -> None:
        for name in ("wer", "cer"):
            values = []
            for split in self.splits[stage]:
                metric = self.metrics[f"{stage}_{split}_{name}"]
                value = metric.compute()
                metric.reset()
                self.log(f"{stage}/{split}/{name}", value)
                values.append(value)
            self.log(f"{stage}/{name}", torch.stack(values).mean(), prog_bar=True)

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate("val", batch, batch_idx, dataloader_idx)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate("test", batch, batch_idx, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._log_error_rates("val")

    def on_test_epoch_end(self) -> None:
        self._log_error_rates("test")

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=[p for p in self.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, total_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
