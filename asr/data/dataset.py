"""Utterances to model inputs: the checks that make an utterance usable, decoding, and the datasets that yield
padded batches from files (map-style) or from archive streams (iterable)."""

from __future__ import annotations

import io
import itertools
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from asr.data.archive import read_archive
from asr.data.batching import bucket_stream
from asr.data.librispeech import SAMPLE_RATE, DataError, Problem, Utterance
from asr.data.text import CharTokenizer, normalize


@dataclass(frozen=True)
class Checks:
    """What makes an utterance usable: its manifest entry (header and transcript), then its decoding."""

    tokenizer: CharTokenizer
    sample_rate: int = SAMPLE_RATE
    resample: bool = False
    # The encoder's receptive field and frame rate (HuBERT/wav2vec 2.0 CNN: 400 samples, a frame per 320).
    min_samples: int = 400
    frames_per_second: float = 50.0
    min_duration: float | None = None
    max_duration: float | None = None

    def problem(self, utt: Utterance, for_training: bool) -> Problem | None:
        """Why ``utt`` cannot be used, or None. Duration limits and the CTC length check apply to training
        only: evaluation keeps every utterance the model can encode, so its WER is over the whole split."""

        def bad(reason: str, detail: str) -> Problem:
            return Problem(reason, utt.where, detail)

        # Checked before normalisation, which would strip such characters from the label silently.
        unknown = self.tokenizer.unknown_characters(utt.transcript.upper().replace("-", " "))
        if unknown:
            return bad("characters outside the vocabulary", "".join(sorted(unknown)))
        if utt.sample_rate != self.sample_rate and not self.resample:
            expected = f"expected {self.sample_rate} Hz (data.resample=true resamples)"
            return bad("wrong sample rate", f"{utt.sample_rate} Hz, {expected}")
        samples = round(utt.duration * self.sample_rate)
        if samples < self.min_samples:
            return bad("shorter than the receptive field", f"{samples} < data.min_samples={self.min_samples}")
        if not for_training:
            return None
        if self.min_duration is not None and utt.duration < self.min_duration:
            return bad("shorter than data.min_duration", f"{utt.duration:.2f} s")
        if self.max_duration is not None and utt.duration > self.max_duration:
            return bad("longer than data.max_duration", f"{utt.duration:.2f} s")
        # CTC needs a frame per label, and a blank between repeated labels; fewer give an infinite loss.
        text = normalize(utt.transcript)
        needed = len(text) + sum(a == b for a, b in itertools.pairwise(text))
        frames = (samples - self.min_samples) * self.frames_per_second // self.sample_rate + 1
        if frames < needed:
            return bad("label longer than the output frames", f"{needed} CTC frames needed, {frames:.0f} in "
                                                                f"{utt.duration:.2f} s")
        return None

    def decode(self, utt: Utterance, source: str | BinaryIO) -> np.ndarray:
        """Mono float32 audio at ``sample_rate``, zero mean and unit variance, or a :class:`DataError`."""
        try:
            audio, rate = sf.read(source, dtype="float32")
        except (sf.LibsndfileError, RuntimeError) as err:
            raise DataError.of(Problem("undecodable audio", utt.where, str(err))) from err
        if len(audio) < utt.num_samples:
            detail = f"{len(audio)} of {utt.num_samples} samples"
            raise DataError.of(Problem("truncated audio", utt.where, detail))
        if audio.ndim == 2:
            audio = audio.mean(axis=1)
        if rate != self.sample_rate:  # problem() let it through: data.resample is on
            audio = AF.resample(torch.from_numpy(audio), rate, self.sample_rate).numpy()
        # Zero mean, unit variance per utterance (in place), as Wav2Vec2FeatureExtractor(do_normalize=True).
        audio -= audio.mean()
        audio *= 1 / np.sqrt(np.dot(audio, audio) / len(audio) + 1e-7)
        return audio

    def item(self, utt: Utterance, source: str | BinaryIO, on_error: str) -> dict:
        """A model input, or ``{"skipped": (reason, where)}`` if decoding fails under ``on_error="skip"``."""
        try:
            audio = self.decode(utt, source)
        except DataError as err:
            if on_error == "raise":
                raise
            return {"skipped": (err.reason, utt.where)}
        text = normalize(utt.transcript)
        return {"id": utt.id, "audio": audio, "labels": self.tokenizer.encode(text), "text": text}


def collate(items: list[dict]) -> dict:
    """Zero-pad audio (with an attention mask) and pad labels with -100, the ignore index of transformers.

    Skipped items are left out and listed as (reason, file) in ``skipped``; a batch may end up empty.
    """
    skipped = [item["skipped"] for item in items if "skipped" in item]
    items = [item for item in items if "skipped" not in item]
    # numpy, not torch: torch's small multi-threaded ops are slower than the decoding on a busy CPU.
    audio_lengths = np.array([len(item["audio"]) for item in items], dtype=np.int64)
    label_lengths = np.array([len(item["labels"]) for item in items], dtype=np.int64)
    audio = np.zeros((len(items), audio_lengths.max(initial=0)), dtype=np.float32)
    labels = np.full((len(items), label_lengths.max(initial=0)), -100, dtype=np.int64)
    for k, item in enumerate(items):
        audio[k, : audio_lengths[k]] = item["audio"]
        labels[k, : label_lengths[k]] = item["labels"]
    return {
        "input_values": torch.from_numpy(audio),
        "attention_mask": torch.from_numpy(np.arange(audio.shape[1])[None, :] < audio_lengths[:, None]),
        "labels": torch.from_numpy(labels),
        "label_lengths": torch.from_numpy(label_lengths),
        "texts": [item["text"] for item in items],
        "ids": [item["id"] for item in items],
        "skipped": skipped,
    }


class SpeechDataset(Dataset):
    """Utterances in audio files, by index (batches come from a :class:`DurationBatchSampler`)."""

    def __init__(self, utterances: Sequence[Utterance], checks: Checks, on_error: str = "skip") -> None:
        self.utterances = list(utterances)
        self.checks = checks
        self.on_error = on_error

    def __len__(self) -> int:
        return len(self.utterances)

    def __getitem__(self, index: int) -> dict:
        utt = self.utterances[index]
        return self.checks.item(utt, utt.path, self.on_error)


def stream_rng(seed: int, epoch: int, pass_: int, shard: int) -> random.Random:
    return random.Random(f"{seed}/{epoch}/{pass_}/{shard}")


def stream_shard_count(utterances: Sequence[Utterance], shard: int, shards: int, batch_size: int | None,
                       max_batch_seconds: float | None, buffer_size: int, seed: int) -> int:
    """How many batches a training stream shard yields in the first pass of epoch 0, from the manifest's
    usable utterances (in stream order)."""
    mine = (u for u in utterances if u.index % shards == shard)
    rng = stream_rng(seed, 0, 0, shard)
    return sum(1 for _ in bucket_stream(mine, _duration, batch_size, max_batch_seconds, buffer_size, rng))


def _duration(record: Utterance | tuple[Utterance, bytes]) -> float:
    return (record if isinstance(record, Utterance) else record[0]).duration


class StreamDataset(IterableDataset):
    """Padded batches read in one pass from LibriSpeech archives (files or URLs), sharded by rank and worker.

    Audio member ``k`` of an archive goes to shard ``k % shards`` with ``shard = rank * workers + worker``:
    every DataLoader worker of every rank reads the archive, and decodes only its own members. Batches are
    bucketed by duration within a buffer of ``buffer_size`` utterances (see :func:`bucket_stream`).

    Training (``batches_per_epoch`` set): each rank yields exactly ``batches_per_epoch`` batches, worker ``w``
    the batches ``w, w + workers, ...`` (the DataLoader takes them in that order). A worker that runs out
    re-reads its shard with another shuffle, and one that has enough stops early: no rank waits for another.
    ``set_epoch(epoch, start)`` skips the first ``start`` batches (a resumed run) without decoding them.
    Evaluation (``batches_per_epoch=None``): one pass, every utterance exactly once across ranks and workers.

    Problems are raised (``on_error="raise"``) or listed in the ``skipped`` of the next batch; an evaluation
    shard that ends with unreported problems yields one last, empty batch to carry them.
    """

    def __init__(self, locations: Sequence[str], checks: Checks, on_error: str = "skip",
                 batch_size: int | None = None, max_batch_seconds: float | None = None,
                 buffer_size: int = 1000, seed: int = 0, rank: int = 0, world_size: int = 1,
                 batches_per_epoch: int | None = None) -> None:
        self.locations = list(locations)
        self.checks = checks
        self.on_error = on_error
        self.batch_size, self.max_batch_seconds = batch_size, max_batch_seconds
        self.buffer_size = buffer_size
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = batches_per_epoch
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError("an evaluation stream has no length before it is read")
        return self.batches_per_epoch

    def _usable(self, shard: int, shards: int, skipped: list) -> Iterator[tuple[Utterance, bytes]]:
        training = self.batches_per_epoch is not None
        for location in self.locations:
            for record in read_archive(location, shard, shards):
                problem = record if isinstance(record, Problem) else self.checks.problem(record[0], training)
                if problem is None:
                    yield record
                elif self.on_error == "raise":
                    raise DataError.of(problem)
                else:
                    skipped.append((problem.reason, problem.where))

    def _batches(self, shard: int, shards: int, pass_: int, skipped: list) -> Iterator[list[tuple]]:
        rng = None if self.batches_per_epoch is None else stream_rng(self.seed, self.epoch, pass_, shard)
        records = self._usable(shard, shards, skipped)
        return bucket_stream(records, _duration, self.batch_size, self.max_batch_seconds, self.buffer_size,
                             rng)

    def _collate(self, batch: list[tuple[Utterance, bytes]], skipped: list) -> dict:
        items = [self.checks.item(utt, io.BytesIO(data), self.on_error) for utt, data in batch]
        items += [{"skipped": s} for s in skipped]
        skipped.clear()
        return collate(items)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers = info.num_workers if info is not None else 1
        # The DataLoader asks its workers in turn from worker 0: after resuming at batch ``start``, worker 0
        # plays the part of the worker that owns that batch, and so on, so that batches keep their order.
        worker = ((info.id if info is not None else 0) + self.start) % workers
        shard, shards = self.rank * workers + worker, self.world_size * workers
        skipped: list[tuple[str, str]] = []
        if self.batches_per_epoch is None:
            for batch in self._batches(shard, shards, 0, skipped):
                yield self._collate(batch, skipped)
            if skipped:
                yield self._collate([], skipped)
            return
        quota = len(range(worker, self.batches_per_epoch, workers))
        done = len(range(worker, self.start, workers))  # this worker's share of the batches already consumed
        produced = 0
        for pass_ in itertools.count():
            if produced == quota:
                return
            before = produced
            for batch in self._batches(shard, shards, pass_, skipped):
                produced += 1
                if produced > done:
                    yield self._collate(batch, skipped)
                else:
                    skipped.clear()  # reported by the run that consumed this batch
                if produced == quota:
                    return
            if produced == before:
                sources = ", ".join(self.locations)
                raise DataError(f"{sources}: no usable utterances for stream shard {shard} of {shards}")
