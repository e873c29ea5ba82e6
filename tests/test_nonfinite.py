"""A step with a non-finite loss or gradients is skipped (no change to the weights or the optimizer's state) and
counted; too many in a row stop training, naming the utterances. DDP ranks all decide alike, with a NaN on one rank
only. Under 16-mixed the gradient scaler skips the step, and it is counted the same way."""

import functools
import logging

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import DataLoader

from asr.model import SpeechRecognizer
from tests.helpers import TINY_HUBERT, batch_of, quiet_trainer

STEPS = 6


class Faulty(SpeechRecognizer):
    """Makes the loss (``"loss"``: a NaN in the batch's first utterance) or one parameter's gradient (``"grad"``, in
    the backward, before DDP averages it) non-finite at chosen (rank, step)s; saves each rank's weights and Adam step
    counts after every step to ``out``."""

    def __init__(self, *args, faults: dict[tuple[int, int], str], out: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.faults, self.out, self.history = faults, out, []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        fault = self.faults.get((self.global_rank, self.global_step))
        if fault == "loss":
            batch["input_values"][0, 100] = float("nan")
        if fault == "grad":
            bias = self.backbone.lm_head.bias
            handle = bias.register_hook(lambda grad: handle.remove() or grad + float("inf"))
        return super().training_step(batch, batch_idx)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        weights = torch.cat([p.detach().flatten() for p in self.parameters()]).clone()
        state = self.trainer.optimizers[0].state
        self.history.append((weights, sorted(int(s["step"]) for s in state.values())))
        torch.save((self.history, self.skipped_steps), f"{self.out}/rank{self.global_rank}.pt")


def batches(tokenizer, rank: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(rank)
    out = []
    for step in range(STEPS):
        audio = [torch.rand(n, generator=generator) * 2 - 1 for n in (8000, 6000)]
        batch = batch_of(audio, [tokenizer.encode("HELLO"), tokenizer.encode("HI")])
        out.append({**batch, "ids": [f"r{rank}-s{step}-a", f"r{rank}-s{step}-b"]})
    return out


class RankBatches(L.LightningDataModule):
    def __init__(self, tokenizer) -> None:
        super().__init__()
        self.tokenizer = tokenizer

    def train_dataloader(self) -> DataLoader:
        return DataLoader(batches(self.tokenizer, self.trainer.global_rank), batch_size=None)


def fit(tokenizer, tmp_path, faults, limit, devices=1, fused=True, **trainer_kwargs) -> Faulty:
    torch.manual_seed(0)
    module = Faulty(
        tokenizer,
        functools.partial(torch.optim.AdamW, lr=1e-3, fused=fused),
        config={**TINY_HUBERT, "mask_time_prob": 0.0},
        freeze_feature_encoder=False,
        max_nonfinite_steps_in_a_row=limit,
        faults=faults,
        out=str(tmp_path),
    )
    trainer = quiet_trainer(
        devices=devices,
        strategy="ddp_fork" if devices > 1 else "auto",
        max_steps=STEPS,
        gradient_clip_val=1.0,
        use_distributed_sampler=False,
        limit_val_batches=0,
        **trainer_kwargs,
    )
    trainer.fit(module, datamodule=RankBatches(tokenizer))
    return module


def changed_at(history) -> list[bool]:
    """Whether each step changed the weights, from the initial weights on (step 0 always does here)."""
    return [not torch.equal(history[k][0], history[k - 1][0]) for k in range(1, len(history))]


def test_a_nonfinite_loss_or_gradient_skips_the_step_and_is_counted(tokenizer, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="asr.model"):
        module = fit(tokenizer, tmp_path, {(0, 1): "loss", (0, 3): "grad"}, limit=2)
    history, skipped = torch.load(tmp_path / "rank0.pt")
    assert skipped == module.skipped_steps == 2
    assert changed_at(history) == [False, True, False, True, True]  # steps 1..5
    # Adam's state moved on only with the steps taken: 4 of 6.
    assert set(history[-1][1]) == {4}
    assert module.trainer.callback_metrics["train/skipped_steps"] == 2
    assert "Step 1 skipped" in caplog.text and "loss nan: r0-s1-a r0-s1-b" in caplog.text
    assert "Step 3 skipped" in caplog.text and "r0-s3-a r0-s3-b" in caplog.text
    assert torch.isfinite(history[-1][0]).all()


def test_too_many_in_a_row_stop_training_naming_the_utterances(tokenizer, tmp_path):
    with pytest.raises(FloatingPointError) as stop:
        fit(tokenizer, tmp_path, {(0, 2): "grad", (0, 3): "loss", (0, 4): "loss"}, limit=3)
    message = str(stop.value)
    assert "Training stopped at step 4: 3 steps in a row" in message
    assert "model.max_nonfinite_steps_in_a_row=3" in message
    assert "Rank 0's batches" in message and "loss nan: r0-s4-a r0-s4-b" in message
    history, skipped = torch.load(tmp_path / "rank0.pt")  # saved after steps 0 to 3: step 4 raised
    assert skipped == 2 and changed_at(history) == [True, False, False]


def test_the_policy_needs_at_least_one_step(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="max_nonfinite_steps_in_a_row must be at least 1"):
        SpeechRecognizer(tokenizer, None, config=TINY_HUBERT, max_nonfinite_steps_in_a_row=0)


def fp16(init_scale: float) -> MixedPrecision:
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))


def test_under_16_mixed_the_gradient_scaler_skips_and_the_step_is_counted(tokenizer, tmp_path, caplog):
    """The model card's setting (16-mixed, AdamW unfused, clipping). From the scaler's first scale, 2**16, this
    random model's gradients overflow: each overflow is a skipped step, logged and counted, and halves the scale."""
    with caplog.at_level(logging.WARNING, logger="asr.model"):
        module = fit(tokenizer, tmp_path, {}, limit=20, fused=False, plugins=[fp16(2.0**16)])
    history, skipped = torch.load(tmp_path / "rank0.pt")
    assert skipped == STEPS and not any(changed_at(history))
    assert module.trainer.precision_plugin.scaler.get_scale() == 2.0 ** (16 - STEPS)
    assert f"the gradient scaler's scale is now {2.0 ** (16 - STEPS):g}" in caplog.text
    # From a scale that does not overflow, a NaN loss: skipped by the scaler, counted.
    module = fit(tokenizer, tmp_path, {(0, 2): "loss"}, limit=2, fused=False, plugins=[fp16(256.0)])
    history, skipped = torch.load(tmp_path / "rank0.pt")
    assert skipped == 1 and changed_at(history) == [True, False, True, True, True]
    assert module.trainer.precision_plugin.scaler.get_scale() == 128.0


def test_ddp_ranks_skip_together_when_one_rank_has_a_nan(tokenizer, tmp_path):
    """Rank 1 alone: a NaN loss at step 1, an infinite gradient at step 3. No hang; both ranks skip both steps and
    end with the same weights."""
    fit(tokenizer, tmp_path, {(1, 1): "loss", (1, 3): "grad"}, limit=2, devices=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for history, skipped in ranks:
        assert skipped == 2
        assert changed_at(history) == [False, True, False, True, True]
        assert set(history[-1][1]) == {4}
    assert all(torch.equal(a[0], b[0]) for a, b in zip(ranks[0][0], ranks[1][0], strict=True))


def test_ddp_ranks_stop_together_naming_their_batches(tokenizer, tmp_path):
    with pytest.raises(Exception, match="Training stopped at step 2: 2 steps in a row") as stop:
        fit(tokenizer, tmp_path, {(1, 1): "loss", (1, 2): "loss"}, limit=2, devices=2)
    assert "s2-a" in str(stop.value)
    for rank in range(2):
        history, skipped = torch.load(tmp_path / f"rank{rank}.pt")
        assert skipped == 1 and len(history) == 2  # both saw step 1 skipped; neither finished step 2
