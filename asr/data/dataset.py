"""Batches by index from a random-access source (map-style), and a loader batch as the model takes it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import BinaryIO

import numpy as np
import torch
from torch.utils.data import Dataset

from asr.data.checks import Checks
from asr.data.librispeech import Problem, Utterance
from asr.data.sources import Source
from asr.data.transfer import SharedSlots, Task


def model_inputs(batch: dict) -> dict:
    """A loader batch as the model takes it, on the device of its audio (meant for after the transfer):

    - ``input_values``: each utterance as float, normalised to zero mean and unit variance over its own samples
      (as Wav2Vec2FeatureExtractor(do_normalize=True)), zero padding; ``attention_mask``; ``lengths``;
    - ``labels`` padded with -100 (transformers' ignore index), and ``label_lengths``.
    """
    pcm, device = batch["input_values"], batch["input_values"].device
    labels = np.full((len(batch["labels"]), max(map(len, batch["labels"]), default=0)), -100, dtype=np.int64)
    for k, label in enumerate(batch["labels"]):
        labels[k, : len(label)] = label
    label_lengths = np.array([len(label) for label in batch["labels"]], dtype=np.int64)

    def to_device(array: np.ndarray) -> torch.Tensor:
        # non_blocking: a blocking copy to a GPU waits for all the work queued there (the previous step); from
        # pageable memory CUDA stages the bytes before returning, so the host array may go at once.
        return torch.from_numpy(array).to(device, non_blocking=True)

    lengths = to_device(np.asarray(batch["lengths"], dtype=np.int64))
    mask = torch.arange(pcm.shape[1], device=device)[None, :] < lengths[:, None]
    audio = pcm.float() / 32768
    count = lengths.clamp(min=1)[:, None].float()
    centered = (audio - audio.sum(1, keepdim=True) / count) * mask
    variance = centered.square().sum(1, keepdim=True) / count
    return {
        **batch,
        "input_values": centered * torch.rsqrt(variance + 1e-7),
        "attention_mask": mask,
        "lengths": lengths,
        "labels": to_device(labels),
        "label_lengths": to_device(label_lengths),
    }


def decode_batch(
    checks: Checks,
    records: Sequence[tuple[Utterance, str | BinaryIO]],
    on_error: str,
    slots: SharedSlots | None,
    iteration: int,
    skipped: Sequence[Problem] = (),
) -> dict:
    """:meth:`Checks.batch`, into a shared slot where a DataLoader worker has one, for a batch of loader
    iteration ``iteration``."""
    if slots is None:
        return checks.batch(records, on_error, skipped)
    try:
        batch = checks.batch(records, on_error, skipped, lambda lengths: slots.buffer(lengths, iteration))
    except BaseException:
        slots.drop()
        raise
    return slots.send(batch)


class SpeechDataset(Dataset):
    """Utterances of a random-access ``source``, by index: a batch sampler's batches, which a
    :class:`~asr.data.loaders.SpeechLoader` hands its workers in tasks; in DataLoader workers decoded into
    ``slots`` where given (:mod:`asr.data.transfer`)."""

    def __init__(
        self,
        source: Source,
        utterances: Sequence[Utterance],
        checks: Checks,
        on_error: str = "skip",
        slots: SharedSlots | None = None,
    ) -> None:
        self.source = source
        self.utterances = list(utterances)
        self.checks = checks
        self.on_error = on_error
        self.slots = slots
        source.preopen(self.utterances)

    def __len__(self) -> int:
        return len(self.utterances)

    def __getitem__(self, index: int) -> dict:
        return self.batch([index])

    def __getitems__(self, task: Task) -> list[dict]:
        """The batches of a task (:class:`~asr.data.transfer.Tasks`): the DataLoader hands them here, and its
        ``collate_fn`` passes them on as they are. (A batch that raises takes the task's earlier batches down with
        it: their slots are freed when the next iteration begins.)"""
        return [self.batch(indices, task.iteration) for indices in task]

    def batch(self, indices: Sequence[int], iteration: int = 0) -> dict:
        """The utterances at ``indices`` as a batch of loader iteration ``iteration``."""
        utterances = [self.utterances[i] for i in indices]
        return decode_batch(
            self.checks, [(u, self.source.open(u)) for u in utterances], self.on_error, self.slots, iteration
        )
