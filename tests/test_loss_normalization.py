"""The CTC loss is normalised by the target tokens of the whole optimizer step (every rank, every accumulated
micro-batch): N devices with batches b1..bN, or k accumulated micro-batches, give the gradient of one device on their
concatenation."""

import functools

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from asr.model import SpeechRecognizer
from tests.helpers import TINY_HUBERT, batch_of

CONFIG = {
    **TINY_HUBERT,
    "feat_extract_norm": "layer",
    "do_stable_layer_norm": True,
    "layerdrop": 0.0,
    "mask_time_prob": 0.0,
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
    "feat_proj_dropout": 0.0,
    "final_dropout": 0.0,
}
# (Layer norms: an utterance's outputs do not depend on the padding of its batch.)
# Four utterances whose labels are far from equal in length: per-device token means would weigh them differently.
TEXTS = ["HELLO WORLD HOW ARE YOU", "A", "SPEECH RECOGNITION", "NO"]
SAMPLES = [16_000, 6_000, 12_000, 5_000]


class GradientRecorder(torch.optim.SGD):
    """SGD at learning rate 0 that saves the gradients it is asked to step with (rank 0)."""

    def __init__(self, params, path: str) -> None:
        super().__init__(params, lr=0.0)
        self.path = path

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            grads = [p.grad.clone() for group in self.param_groups for p in group["params"] if p.grad is not None]
            torch.save(grads, self.path)
        return loss


def merged(tokenizer, indices: list[int]) -> dict:
    generator = torch.Generator().manual_seed(0)
    audios = [torch.rand(n, generator=generator) * 2 - 1 for n in SAMPLES]
    batch = batch_of([audios[i] for i in indices], [tokenizer.encode(TEXTS[i]) for i in indices])
    return {**batch, "ids": [f"utt{i}" for i in indices]}


def make_module(tokenizer, path) -> SpeechRecognizer:
    torch.manual_seed(0)
    return SpeechRecognizer(
        tokenizer, functools.partial(GradientRecorder, path=str(path)), config=CONFIG, freeze_feature_encoder=False
    )


def reference_gradients(tokenizer, path) -> list[torch.Tensor]:
    """One process, the whole global batch at once: F.ctc_loss summed, over the number of target tokens."""
    module = make_module(tokenizer, path)
    batch = merged(tokenizer, [0, 1, 2, 3])
    logits, lengths = module(batch["input_values"], batch["attention_mask"])
    log_probs = logits.float().log_softmax(-1).transpose(0, 1)
    loss = F.ctc_loss(
        log_probs,
        batch["labels"].clamp(min=0),
        lengths,
        batch["label_lengths"],
        blank=tokenizer.pad_id,
        reduction="sum",
        zero_infinity=True,
    )
    (loss / batch["label_lengths"].sum()).backward()
    return [p.grad for p in module.parameters() if p.grad is not None]


class RankBatches(L.LightningDataModule):
    """Each rank's micro-batches, as model inputs (the real DataModule makes them the same way)."""

    def __init__(self, tokenizer, per_rank: list[list[list[int]]]) -> None:
        super().__init__()
        self.tokenizer, self.per_rank = tokenizer, per_rank

    def train_dataloader(self) -> DataLoader:
        batches = [merged(self.tokenizer, indices) for indices in self.per_rank[self.trainer.global_rank]]
        return DataLoader(batches, batch_size=None)


def trained_gradients(tokenizer, path, per_rank, accumulate: int) -> list[torch.Tensor]:
    module = make_module(tokenizer, path)
    devices = len(per_rank)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_fork" if devices > 1 else "auto",
        max_steps=1,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=RankBatches(tokenizer, per_rank))
    return torch.load(path)


@pytest.mark.parametrize(
    ("per_rank", "accumulate"),
    [([[[0, 1, 2, 3]]], 1), ([[[0, 1], [2, 3]]], 2), ([[[0, 2]], [[1, 3]]], 1), ([[[0], [3]], [[1], [2]]], 2)],
    ids=["one-batch", "accumulated", "two-ranks", "two-ranks-accumulated"],
)
def test_gradients_do_not_depend_on_how_the_batch_is_split(tokenizer, tmp_path, per_rank, accumulate):
    expected = reference_gradients(tokenizer, tmp_path / "unused.pt")
    got = trained_gradients(tokenizer, tmp_path / "grads.pt", per_rank, accumulate)
    assert len(got) == len(expected) and all(g.shape == e.shape for g, e in zip(got, expected, strict=True))
    # Relative to the whole gradient: float32 sums in another order differ by 1e-5 to 2e-4; per-device or
    # per-micro-batch token means by 8% or more here. (Some gradients are near zero: no per-element tolerance.)
    difference = torch.cat([(g - e).flatten() for g, e in zip(got, expected, strict=True)]).norm()
    assert difference / torch.cat([e.flatten() for e in expected]).norm() < 1e-3


def test_the_loss_is_the_ctc_sum_over_the_token_count(tokenizer, tmp_path):
    """Fast and direct: what the module computes against F.ctc_loss(reduction="sum") over the batch's target tokens,
    on labels of very unequal lengths and one utterance with more labels than frames (its loss is zeroed, its
    tokens still count)."""
    module = make_module(tokenizer, tmp_path / "unused.pt")
    batch = merged(tokenizer, [0, 1, 2, 3])
    short = batch_of([torch.rand(300) * 2 - 1], [tokenizer.encode("FAR TOO MANY LETTERS")])
    with torch.no_grad():
        logits, lengths = module(batch["input_values"], batch["attention_mask"])
        short_logits, short_lengths = module(short["input_values"], short["attention_mask"])
    assert short_lengths[0] < short["label_lengths"][0]

    def reference(logits, lengths, batch, reduction="sum"):
        return F.ctc_loss(
            logits.log_softmax(-1).transpose(0, 1),
            batch["labels"].clamp(min=0),
            lengths,
            batch["label_lengths"],
            blank=tokenizer.pad_id,
            reduction=reduction,
            zero_infinity=True,
        )

    tokens = int(batch["label_lengths"].sum())
    expected = reference(logits, lengths, batch) / tokens
    assert float(module.ctc_loss(logits, lengths, batch)) == pytest.approx(float(expected), rel=1e-6)
    assert float(module.ctc_sum(logits, lengths, batch)) == pytest.approx(float(expected) * tokens, rel=1e-6)
    # Not PyTorch's "mean" (each utterance over its own length, then averaged), which differs here.
    assert float(reference(logits, lengths, batch, "mean")) != pytest.approx(float(expected), rel=0.05)
    assert float(module.ctc_loss(short_logits, short_lengths, short)) == 0.0
