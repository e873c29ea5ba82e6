"""The LightningModule: a transformers CTC model (HuBERT, wav2vec 2.0, WavLM, ...) with greedy decoding and WER."""

from __future__ import annotations

import logging
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Timer
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.text import CharErrorRate, WordErrorRate

from asr import speedups
from asr.backbones import build_backbone, input_facts
from asr.data.text import CharTokenizer
from asr.decoding import Decoder, GreedyDecoder

log = logging.getLogger(__name__)
STAGES = {"val": "validation", "test": "test"}
# The model's on_before_batch_transfer (host-side packing) is meant to run with any DataModule.
warnings.filterwarnings("ignore", message="You have overridden `on_before_batch_transfer` in `Lightning")


class SpeechRecognizer(L.LightningModule):
    def __init__(
        self,
        tokenizer: CharTokenizer,
        optimizer: Callable[..., torch.optim.Optimizer] | None,
        decoder: Decoder | None = None,
        pretrained: str | None = None,
        sample_rate: int = 16_000,
        config: dict | None = None,
        freeze_feature_encoder: bool = True,
        freeze_feature_encoder_after: int | None = None,
        freeze_encoder_steps: int = 0,
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        val_splits: tuple[str, ...] = ("dev",),
        test_splits: tuple[str, ...] = ("test",),
        attn_implementation: str | None = None,
        device_specaugment: bool = True,
        sync_free_logging: bool = True,
        packed: bool = False,
        onednn_conv: bool = True,
        compile: str | None = None,
        compile_options: dict | None = None,
        max_nonfinite_steps_in_a_row: int = 20,
    ) -> None:
        """``optimizer`` and ``scheduler`` are factories (``_partial_``), None to evaluate only; ``decoder`` turns
        logits into text for the WER (greedy when not given). ``sample_rate`` is what the encoder takes. For the first
        ``freeze_encoder_steps`` steps only the CTC head learns (fairseq's ``freeze_finetune_updates``): the encoder
        runs without gradients, so DDP needs ``trainer.strategy=ddp_find_unused_parameters_true``.

        The speed switches (see asr/speedups.py; none changes what is computed, up to the random masks):

        - ``device_specaugment``: SpecAugment masks drawn on the device and applied without boolean indexing,
          so a training step does not wait for the GPU to build them (they also never fall on padding);
        - ``sync_free_logging``: ``train/loss`` (mean since the last log) and ``train/lr`` are logged every
          ``trainer.log_every_n_steps`` steps from host values, instead of device values every step that the
          progress bar reads back;
        - ``packed``: the transformer layers run on the valid frames only, with variable-length attention
          (``attn_implementation`` becomes ``asr_packed``; HuBERT and wav2vec 2.0);
        - ``onednn_conv``: False runs CPU convolutions (forward and backward) with PyTorch's native kernels
          instead of oneDNN's, much faster for a trained feature encoder on variable-width batches;
        - ``compile``: ``layers`` (and/or ``feature_encoder``, joined with ``+``) compiles those modules,
          in place, with ``compile_options`` when fitting or testing starts.

        An optimizer step whose loss or gradients are not finite is skipped and counted (:meth:`optimizer_step`);
        ``max_nonfinite_steps_in_a_row`` such steps in a row stop training.
        """
        if max_nonfinite_steps_in_a_row < 1:
            raise ValueError(f"max_nonfinite_steps_in_a_row must be at least 1, not {max_nonfinite_steps_in_a_row}")
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer", "optimizer", "scheduler", "decoder"])
        self.tokenizer = tokenizer
        self.decoder = decoder or GreedyDecoder(tokenizer)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        if packed:
            speedups.register_packed_attention()
            attn_implementation = speedups.PACKED_ATTENTION
        self.backbone = build_backbone(pretrained, config or {}, tokenizer, attn_implementation)
        self.packed_encoder = speedups.install_packed_encoder(self.backbone) if packed else None
        cfg = self.backbone.config
        self.device_specaugment = device_specaugment and (cfg.mask_time_prob > 0 or cfg.mask_feature_prob > 0)
        if self.device_specaugment:
            speedups.install_device_specaugment(self.backbone)
        self.compiled: list[str] = []
        self._loss_sum: torch.Tensor | None = None
        self._step_tokens: torch.Tensor | None = None  # target tokens of the optimizer step so far, on this rank
        self._normaliser: torch.Tensor | None = None  # of the step's losses (_step_normaliser)
        self._loss_steps = 0
        self._step_batches: list[tuple[list[str], torch.Tensor]] = []  # ids and loss of the step's micro-batches
        self._train_batch_size: tuple[int, int] = (0, 0)  # utterances and padded width (samples) of the last one
        self.skipped_steps = 0  # optimizer steps skipped for a non-finite loss or gradients, in all
        self.nonfinite_in_a_row = 0
        self.feature_encoder_frozen = False
        if freeze_feature_encoder:
            self._freeze_feature_encoder()
        self.splits = {"val": list(val_splits), "test": list(test_splits)}
        self.metrics = nn.ModuleDict(
            {
                f"{stage}_{split}_{name}": metric()
                for stage, splits in self.splits.items()
                for split in splits
                for name, metric in (("wer", WordErrorRate), ("cer", CharErrorRate), ("loss", MeanMetric))
            }
        )

    @property
    def input_facts(self) -> dict:
        """The sample rate, receptive field (samples) and frame rate of the encoder (asr.backbones.input_facts)."""
        return input_facts(self.backbone.config, self.hparams.sample_rate)

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

    def configure_model(self) -> None:
        if self.hparams.compile and not self.compiled:
            hp = self.hparams
            self.compiled = speedups.compile_regions(self.backbone, hp.compile, hp.compile_options)
            log.info("torch.compile: %s", ", ".join(self.compiled))

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        # Still on the host: what the packed encoder needs is computed here, not read back from the GPU later.
        if self.packed_encoder is not None and "input_values" in batch and len(batch["input_values"]):
            batch["packing"] = self._packing(torch.tensor(batch["lengths"]), batch["input_values"].shape[1], pin=True)
        return batch

    def _packing(self, lengths: torch.Tensor, width: int, pin: bool = False) -> speedups.Packing:
        """From the audio lengths (samples) and the padded width of a batch."""
        feat_lengths = self.backbone._get_feat_extract_output_lengths
        frames = int(feat_lengths(torch.tensor(width)))
        return speedups.packing_of(feat_lengths(lengths.cpu()), frames, pin=pin)

    def forward(
        self,
        input_values: torch.Tensor,
        attention_mask: torch.Tensor,
        packing: speedups.Packing | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (batch, frames, vocab) and the number of valid frames of each utterance."""
        lengths = self.backbone._get_feat_extract_output_lengths(attention_mask.sum(-1))
        kwargs = {}
        if self.device_specaugment and self.training and self.backbone.config.mask_time_prob > 0:
            cfg = self.backbone.config
            frames = int(self.backbone._get_feat_extract_output_lengths(torch.tensor(input_values.shape[1])))
            kwargs["mask_time_indices"] = speedups.time_mask(
                lengths, frames, cfg.mask_time_prob, cfg.mask_time_length, cfg.mask_time_min_masks
            )
        if self.packed_encoder is None:
            with speedups.onednn(self.hparams.onednn_conv):
                return self._logits(input_values, attention_mask, kwargs), lengths
        if packing is None:
            packing = self._packing(attention_mask.sum(-1), attention_mask.shape[1])
        self.packed_encoder.asr_packing = packing.to(input_values.device, non_blocking=True)
        try:
            with speedups.onednn(self.hparams.onednn_conv):
                logits = self._logits(input_values, attention_mask, kwargs)
        finally:
            self.packed_encoder.asr_packing = None
        return logits, lengths

    def _logits(self, input_values: torch.Tensor, attention_mask: torch.Tensor, kwargs: dict) -> torch.Tensor:
        backbone = self.backbone
        if not (self.training and self.global_step < self.hparams.freeze_encoder_steps):
            return backbone(input_values, attention_mask=attention_mask, **kwargs).logits
        with torch.no_grad():  # the encoder is frozen: only the CTC head learns
            hidden = backbone.base_model(input_values, attention_mask=attention_mask, **kwargs)[0]
        return backbone.lm_head(backbone.dropout(hidden))

    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        with self._naming_out_of_memory("training", *self._train_batch_size), speedups.onednn(self.hparams.onednn_conv):
            super().backward(loss, *args, **kwargs)

    @contextmanager
    def _naming_out_of_memory(self, stage: str, utterances: int, width: int) -> Iterator[None]:
        """Turns an out-of-memory error into one that names the batch and the settings that make batches smaller."""
        try:
            yield
        except torch.OutOfMemoryError as err:
            seconds = width / self.hparams.sample_rate
            prefix = "data." if stage == "training" else "data.eval_"
            raise torch.OutOfMemoryError(
                f"Out of memory in a {stage} batch of {utterances} utterances, {utterances * seconds:.1f} s of audio "
                f"with padding (the longest {seconds:.1f} s), on rank {self.global_rank}. Make batches smaller: "
                f"{prefix}max_batch_seconds when batching by seconds of audio, {prefix}batch_size when by "
                f"utterances. ({str(err).splitlines()[0] if str(err) else 'no details'})"
            ) from err

    def ctc_sum(self, logits: torch.Tensor, lengths: torch.Tensor, batch: dict) -> torch.Tensor:
        """CTC summed over the batch."""
        log_probs = logits.float().log_softmax(-1).transpose(0, 1)
        targets = batch["labels"].clamp(min=0)
        return F.ctc_loss(
            log_probs,
            targets,
            lengths,
            batch["label_lengths"],
            blank=self.tokenizer.pad_id,
            reduction="sum",
            zero_infinity=True,
        )

    def ctc_loss(self, logits: torch.Tensor, lengths: torch.Tensor, batch: dict) -> torch.Tensor:
        """CTC summed over the batch, divided by its number of target tokens."""
        return self.ctc_sum(logits, lengths, batch) / batch["label_lengths"].sum()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """CTC summed over the batch, divided by a normaliser shared by the optimizer step's micro-batches and ranks
        (:meth:`_step_normaliser`): :meth:`optimizer_step` then makes the gradient that of the step's whole CTC sum
        over its whole token count, however the batch was split over devices and accumulated micro-batches."""
        if not batch["ids"]:  # all failed to decode (data.on_error=skip): a zero step keeps DDP ranks in step
            self._step_normaliser(torch.zeros((), dtype=torch.long, device=self.device))
            return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
        self._train_batch_size = tuple(batch["attention_mask"].shape)
        with self._naming_out_of_memory("training", *self._train_batch_size):
            logits, lengths = self(batch["input_values"], batch["attention_mask"], batch.get("packing"))
            summed = self.ctc_sum(logits, lengths, batch)
        tokens = batch["label_lengths"].sum()
        loss = summed.detach() / tokens  # what is logged: this batch's loss per token
        self._step_batches.append((batch["ids"], loss))
        batch_size = len(batch["ids"])
        if self.hparams.sync_free_logging:
            self._log_train_loss_every_n_steps(loss, batch_size)
        else:
            self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
            self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=batch_size)
        # Utterances with more labels than frames give an infinite CTC loss, zeroed above; count them.
        too_short = (lengths < batch["label_lengths"]).sum().float()
        self.log("train/infeasible_utterances", too_short, on_step=False, on_epoch=True, reduce_fx="sum")
        self.log(
            "train/audio_seconds",
            batch["attention_mask"].sum().float() / self.hparams.sample_rate,
            on_step=False,
            on_epoch=True,
            reduce_fx="sum",
        )
        return summed / self._step_normaliser(tokens)

    def _step_normaliser(self, tokens: torch.Tensor) -> torch.Tensor:
        """Count the target tokens of the optimizer step; return the step's normaliser: the first micro-batch's
        tokens over all ranks (the same on every rank, and of the order of the step's count, which keeps the loss
        near 1 for fp16 scaling). One collective of a scalar per step, none without DDP."""
        self._step_tokens = tokens if self._step_tokens is None else self._step_tokens + tokens
        if self._normaliser is None:
            self._normaliser = self._sum_over_ranks(tokens.float()).clamp(min=1)
        return self._normaliser

    def _sum_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        if self._trainer is None or self.trainer.world_size == 1:
            return value
        return self.trainer.strategy.reduce(value, reduce_op="sum")

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """After the step's last backward (DDP has averaged the gradients over ranks, and Lightning has divided each
        micro-batch's loss by ``accumulate_grad_batches``), rescale the gradients to those of the step's CTC sum over
        its tokens on all ranks. Before the gradient scaler, clipping and any callback see them.

        A step whose gradients are not finite (a non-finite loss on any rank makes them so) is skipped: without a
        gradient scaler its gradients are dropped, so the optimizer changes neither weights nor state; under
        ``16-mixed`` the scaler skips it (and lowers its scale). DDP has already made every rank's gradients the
        same, so all ranks decide alike without a collective. Costs one read-back from the device per step."""
        finite = True

        def closure():
            nonlocal finite
            result = optimizer_closure()
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            factor = torch.ones(())
            if self._step_tokens is not None:
                trainer = self.trainer
                total = self._sum_over_ranks(self._step_tokens.float()).clamp(min=1)
                factor = trainer.world_size * trainer.accumulate_grad_batches * self._normaliser / total
            self._step_tokens = self._normaliser = None
            finite = _scale_and_check([p.grad for p in params], factor)
            if not finite and getattr(self.trainer.precision_plugin, "scaler", None) is None:
                for p in params:
                    p.grad = None
            return result

        optimizer.step(closure=closure)
        self._count_nonfinite(finite)

    def _count_nonfinite(self, finite: bool) -> None:
        """Counts a skipped step (``train/skipped_steps``), naming its utterances; stops after too many in a row."""
        batches, self._step_batches = self._step_batches, []
        if finite:
            self.nonfinite_in_a_row = 0
        else:
            self.skipped_steps += 1
            self.nonfinite_in_a_row += 1
            limit = self.hparams.max_nonfinite_steps_in_a_row
            where = "; ".join(f"loss {float(loss):.4g}: {' '.join(ids)}" for ids, loss in batches) or "no batch"
            scaler = getattr(self.trainer.precision_plugin, "scaler", None)
            scale = "" if scaler is None else f" (16-mixed: the gradient scaler's scale is now {scaler.get_scale():g})"
            log.warning(
                "Step %d skipped: non-finite loss or gradients%s, %d in a row, %d in all. Rank %d's batches: %s",
                self.global_step,
                scale,
                self.nonfinite_in_a_row,
                self.skipped_steps,
                self.global_rank,
                where,
            )
            if self.nonfinite_in_a_row >= limit:
                raise FloatingPointError(
                    f"Training stopped at step {self.global_step}: {limit} steps in a row had a non-finite loss or "
                    f"gradients (model.max_nonfinite_steps_in_a_row={limit}). Rank {self.global_rank}'s batches of "
                    f"the last one, with their loss per token: {where}. The skipped steps before it are logged "
                    f"with their utterances."
                )
        # On the steps the logger writes (and each skip): not a new value and a log call every step.
        trainer = self._trainer
        if not finite or trainer is None or trainer._logger_connector.should_update_logs:
            self.log("train/skipped_steps", torch.tensor(float(self.skipped_steps)), on_step=True, batch_size=1)

    def _log_train_loss_every_n_steps(self, loss: torch.Tensor, batch_size: int) -> None:
        """Log the mean loss since the last logger write, every ``trainer.log_every_n_steps`` steps.

        Only a logging step reads a value back from the device. The values logged are host tensors, which the
        progress bar reads for free; a device tensor logged each step is read back at every refresh.
        """
        loss = loss.detach().float()
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        self._loss_steps += 1
        # Lightning writes to the logger at this step. Its count is not global_step: after a resume it is one ahead.
        trainer = self._trainer
        written = trainer is None or bool(trainer.fast_dev_run) or trainer._logger_connector.should_update_logs
        if written or self.global_step == 0:  # the first step too, for the progress bar
            mean = (self._loss_sum / self._loss_steps).cpu()
            if written:
                self._loss_sum, self._loss_steps = None, 0
            self.log("train/loss", mean, prog_bar=True, batch_size=batch_size)
            lr = torch.tensor(float(self.optimizers().param_groups[0]["lr"]))
            self.log("train/lr", lr, batch_size=batch_size)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        # Lightning refuses to clip for optimizers that can unscale gradients themselves (fused AdamW) under
        # mixed precision, although without a gradient scaler (bf16-mixed) clipping before the step is exact.
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if gradient_clip_val and scaler is None and getattr(optimizer, "_step_supports_amp_scaling", False):
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The full backbone config, so that a checkpoint can be rebuilt without the hub (asr.evaluate).
        checkpoint["backbone_config"] = self.backbone.config.to_diff_dict()
        checkpoint["nonfinite_steps"] = {"skipped": self.skipped_steps, "in_a_row": self.nonfinite_in_a_row}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        counts = checkpoint.get("nonfinite_steps", {})
        self.skipped_steps, self.nonfinite_in_a_row = counts.get("skipped", 0), counts.get("in_a_row", 0)

    def _evaluate(self, stage: str, batch: dict, batch_idx: int, dataloader_idx: int) -> list[str]:
        """Updates the split's metrics; returns the batch's transcripts."""
        split = self.splits[stage][dataloader_idx]
        if not batch["ids"]:  # all failed to decode (data.on_error=skip); the DataModule counted them
            return []
        with self._naming_out_of_memory(STAGES[stage], *batch["attention_mask"].shape):
            logits, lengths = self(batch["input_values"], batch["attention_mask"], batch.get("packing"))
            loss = self.ctc_loss(logits, lengths, batch)
            self.metrics[f"{stage}_{split}_loss"].update(loss, weight=len(batch["ids"]))
            hypotheses = self.decoder(logits, lengths)
        self.metrics[f"{stage}_{split}_wer"].update(hypotheses, batch["texts"])
        self.metrics[f"{stage}_{split}_cer"].update(hypotheses, batch["texts"])
        if batch_idx == 0:
            log.info("%s/%s example\n  ref: %s\n  hyp: %s", stage, split, batch["texts"][0], hypotheses[0])
        return hypotheses

    def _log_metrics(self, stage: str) -> None:
        """WER, CER and loss per split, and the splits' mean error rates. Every rank computes every metric, whose
        states torchmetrics syncs: a rank that got no batch of a split (fewer utterances than ranks, or all
        undecodable) joins the same collectives as the others instead of leaving them waiting."""
        for name in ("wer", "cer", "loss"):
            values = []
            for split in self.splits[stage]:
                metric = self.metrics[f"{stage}_{split}_{name}"]
                value = metric.compute()
                metric.reset()
                self.log(f"{stage}/{split}/{name}", value)
                values.append(value)
            if name != "loss":
                self.log(f"{stage}/{name}", torch.stack(values).mean(), prog_bar=True)

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> list[str]:
        """The batch's transcripts, which callbacks get as ``outputs`` (asr.callbacks.ValidationSamples)."""
        return self._evaluate("val", batch, batch_idx, dataloader_idx)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> list[str]:
        """The batch's transcripts, which callbacks get as ``outputs`` (asr.evaluate collects them)."""
        return self._evaluate("test", batch, batch_idx, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=[p for p in self.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return optimizer
        schedule = {"total_steps": int(self.trainer.estimated_stepping_batches)}
        timer = next((c for c in self.trainer.callbacks if isinstance(c, Timer)), None)
        if timer is not None and timer.time_remaining() is not None:
            # trainer.max_time: Lightning's Timer counts the training time (across resumes too).
            budget = timer.time_elapsed() + timer.time_remaining()
            schedule["time_fraction"] = lambda: timer.time_elapsed() / budget
        scheduler = self.scheduler_factory(optimizer, **schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _scale_and_check(grads: list[torch.Tensor], factor: torch.Tensor) -> bool:
    """Multiplies the gradients by ``factor``; returns whether they are all finite. The gradient scaler's own
    fused kernel, which does both in one pass; one read-back per device."""
    groups: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for grad in grads:
        groups[grad.device, grad.dtype].append(grad)
    found: dict[torch.device, torch.Tensor] = {}
    for (device, _), group in groups.items():
        inf = found.setdefault(device, torch.zeros(1, device=device))
        torch._amp_foreach_non_finite_check_and_unscale_(group, inf, factor.to(device, torch.float32).reshape(1))
    return not any(bool(inf) for inf in found.values())
