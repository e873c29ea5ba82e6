"""Utterances to model inputs: the checks that make an utterance usable, decoding, and the datasets that yield
padded batches from files (map-style) or from archive streams (iterable)."""

from __future__ import annotations

import io
import itertools
import math
import random
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from asr.data import hf
from asr.data.archive import IndexedRegions, cut_regions, read_archive, read_members
from asr.data.batching import bucket_stream
from asr.data.librispeech import SAMPLE_RATE, DataError, Problem, Utterance
from asr.data.text import CharTokenizer, canonical, normalize
from asr.data.transfer import SharedSlots, Task, pcm_buffer


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
    max_batch_seconds: float | None = None  # training batches' budget: a longer utterance fits in none

    def problem(self, utt: Utterance, for_training: bool) -> Problem | None:
        """Why ``utt`` cannot be used, or None. Duration limits and the CTC length check apply to training
        only: evaluation keeps every utterance the model can encode, so its WER is over the whole split."""

        def bad(reason: str, detail: str) -> Problem:
            return Problem(reason, utt.where, detail)

        # Checked before normalisation, which would strip such characters from the label silently.
        unknown = self.tokenizer.unknown_characters(canonical(utt.transcript))
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
        if self.max_batch_seconds is not None and utt.duration > self.max_batch_seconds:
            return bad("longer than data.max_batch_seconds", f"{utt.duration:.2f} s")
        # CTC needs a frame per label, and a blank between repeated labels; fewer give an infinite loss.
        text = normalize(utt.transcript)
        needed = len(text) + sum(a == b for a, b in itertools.pairwise(text))
        frames = (samples - self.min_samples) * self.frames_per_second // self.sample_rate + 1
        if frames < needed:
            return bad("label longer than the output frames", f"{needed} CTC frames needed, {frames:.0f} in "
                                                                f"{utt.duration:.2f} s")
        return None

    def samples(self, utt: Utterance) -> int:
        """How many samples ``utt`` decodes to, at ``sample_rate``: its row in a padded batch."""
        if utt.sample_rate == self.sample_rate:
            return utt.num_samples
        return math.ceil(utt.num_samples * self.sample_rate / utt.sample_rate)  # as torchaudio resamples

    def decode(self, utt: Utterance, source: str | BinaryIO, out: np.ndarray | None = None) -> np.ndarray:
        """Mono 16-bit PCM at ``sample_rate``, ``samples(utt)`` long, or a :class:`DataError`. Written into
        ``out`` when given; mono audio at ``sample_rate`` (all of LibriSpeech) is decoded straight into it."""
        try:
            with sf.SoundFile(source) as f:
                direct = f.channels == 1 and f.samplerate == self.sample_rate
                if direct:
                    audio = f.read(dtype="int16") if out is None else f.read(out=out)
                else:
                    audio, rate = f.read(dtype="float32"), f.samplerate
        except (sf.LibsndfileError, RuntimeError) as err:
            raise DataError.of(Problem("undecodable audio", utt.where, str(err))) from err
        if not direct:
            if audio.ndim == 2:
                audio = audio.mean(axis=1)
            if rate != self.sample_rate:  # problem() let it through: data.resample is on
                audio = AF.resample(torch.from_numpy(audio), rate, self.sample_rate).numpy()
            audio = np.clip(np.round(audio * 32768), -32768, 32767).astype(np.int16)
        if len(audio) < self.samples(utt):
            detail = f"{len(audio)} of {self.samples(utt)} samples"
            raise DataError.of(Problem("truncated audio", utt.where, detail))
        if out is None or direct:
            return audio
        out[:] = audio[: len(out)]
        return out

    def batch(self, records: Sequence[tuple[Utterance, str | BinaryIO]], on_error: str,
              skipped: Sequence[tuple[str, str]] = (),
              buffer: Callable[[Sequence[int]], torch.Tensor] = pcm_buffer) -> dict:
        """Decode utterances into one zero-padded 16-bit PCM ``buffer`` (made for their lengths): a loader batch,
        with ``lengths``, ``labels`` (token ids), ``texts``, ``ids`` and ``skipped`` as lists. Under
        ``on_error="skip"`` the utterances that fail are left out and listed as (reason, file) in ``skipped``,
        after the given ``skipped``. :func:`model_inputs` makes the model's inputs from it."""
        lengths = [self.samples(utt) for utt, _ in records]
        pcm = buffer(lengths)
        rows, failed = pcm.numpy(), []
        for k, ((utt, source), n) in enumerate(zip(records, lengths, strict=True)):
            try:
                self.decode(utt, source, out=rows[k, :n])
            except DataError as err:
                if on_error == "raise":
                    raise
                failed.append(k)
                skipped = [*skipped, (err.reason, utt.where)]
        if failed:  # rare: a copy of the buffer without them
            keep = [k for k in range(len(records)) if k not in failed]
            records, lengths = [records[k] for k in keep], [lengths[k] for k in keep]
            pcm = pcm[keep, : max(lengths, default=0)]
        texts = [normalize(utt.transcript) for utt, _ in records]
        return {"input_values": pcm, "lengths": lengths, "labels": [self.tokenizer.encode(t) for t in texts],
                "texts": texts, "ids": [utt.id for utt, _ in records], "skipped": list(skipped)}


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
    return {**batch, "input_values": centered * torch.rsqrt(variance + 1e-7), "attention_mask": mask,
            "lengths": lengths, "labels": to_device(labels), "label_lengths": to_device(label_lengths)}


def decode_batch(checks: Checks, records: Sequence[tuple[Utterance, str | BinaryIO]], on_error: str,
                 slots: SharedSlots | None, iteration: int, skipped: Sequence[tuple[str, str]] = ()) -> dict:
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
    """Utterances in audio files, by index: a :class:`DurationBatchSampler`'s batches, which a
    :class:`~asr.data.datamodule.SpeechLoader` hands its workers in tasks; in DataLoader workers decoded into
    ``slots`` where given (:mod:`asr.data.transfer`)."""

    def __init__(self, utterances: Sequence[Utterance], checks: Checks, on_error: str = "skip",
                 slots: SharedSlots | None = None) -> None:
        self.utterances = list(utterances)
        self.checks = checks
        self.on_error = on_error
        self.slots = slots
        # Hugging Face splits, opened here: workers get them with the dataset (memory-mapped, pickled by file
        # name when spawned) instead of each loading the dataset again.
        self.hf_splits = {path: hf.open_split(path) for path in {u.path for u in self.utterances} if hf.is_hf(path)}

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
        return decode_batch(self.checks, [(u, self._source(u)) for u in utterances], self.on_error, self.slots,
                            iteration)

    def _source(self, utt: Utterance) -> str | BinaryIO:
        return hf.audio(self.hf_splits[utt.path], utt) if utt.path in self.hf_splits else utt.path


def stream_rng(seed: int, epoch: int, pass_: int, shard: int) -> random.Random:
    return random.Random(f"{seed}/{epoch}/{pass_}/{shard}")


def stream_shards(utterances: Sequence[Utterance], shards: int, indexed: Collection[str]) -> list[list[Utterance]]:
    """Each stream shard's usable utterances (of a manifest, in stream order): of an archive in
    ``indexed``, a contiguous region (:func:`~asr.data.archive.cut_regions`); of any other, every ``shards``-th
    audio member, as :func:`~asr.data.archive.read_archive` deals them."""
    result: list[list[Utterance]] = [[] for _ in range(shards)]
    for location, group in itertools.groupby(utterances, key=lambda u: u.path):
        if location in indexed:
            for shard, region in enumerate(cut_regions(list(group), shards)):
                result[shard] += region
        else:
            for utt in group:
                result[utt.index % shards].append(utt)
    return result


def region_from_a_start(region: list[Utterance], seed: int, epoch: int, pass_: int, shard: int) -> list[Utterance]:
    """A training shard's region of an archive, read from a start drawn for the epoch and pass, wrapping around:
    the utterances a shard leaves out when it reaches its quota are not the same ones every epoch."""
    if not region:
        return region
    start = random.Random(f"{seed}/{epoch}/{pass_}/{shard}/{region[0].path}").randrange(len(region))
    return [*region[start:], *region[:start]]


def stream_shard_count(utterances: Sequence[Utterance], shard: int, indexed: Collection[str], batch_size: int | None,
                       max_batch_seconds: float | None, buffer_size: int, seed: int) -> int:
    """How many batches training stream shard ``shard`` yields from its ``utterances`` (of archives read by
    region where in ``indexed``) in the first pass of epoch 0."""
    ordered: list[Utterance] = []
    for location, group in itertools.groupby(utterances, key=lambda u: u.path):
        group = list(group)
        ordered += region_from_a_start(group, seed, 0, 0, shard) if location in indexed else group
    rng = stream_rng(seed, 0, 0, shard)
    return sum(1 for _ in bucket_stream(ordered, _duration, batch_size, max_batch_seconds, buffer_size, rng))


def _duration(record: Utterance | tuple[Utterance, bytes]) -> float:
    return (record if isinstance(record, Utterance) else record[0]).duration


class StreamDataset(IterableDataset):
    """Padded batches read in one pass from LibriSpeech archives (files or URLs), sharded by rank and worker.

    Each (rank, worker) is a shard, ``shard = rank * workers + worker``, and reads its audio members in stream
    order (:func:`stream_shards`): of an archive in ``indexed`` (with a gzip index from its manifest scan: a local
    file, or a URL served by byte ranges), its region, read through the index (in training from a start drawn for
    each epoch and pass, wrapping around: :func:`region_from_a_start`); of any other, member ``k`` if
    ``k % shards == shard``, so every shard inflates the whole archive and decodes its own members only. Batches
    are bucketed by duration within a buffer of ``buffer_size`` utterances (see :func:`bucket_stream`).

    Training (``batches_per_epoch`` set): each rank yields exactly ``batches_per_epoch`` batches, worker ``w``
    the batches ``w, w + workers, ...`` (the DataLoader takes them in that order). A worker that runs out
    re-reads its shard with another shuffle, and one that has enough stops early: no rank waits for another.
    ``set_epoch(epoch, start)`` skips the first ``start`` batches (a resumed run) without decoding them.
    Evaluation (``batches_per_epoch=None``): one pass, every utterance exactly once across ranks and workers.

    Problems are raised (``on_error="raise"``) or listed in the ``skipped`` of the next batch; an evaluation
    shard that ends with unreported problems yields one last, empty batch to carry them. With ``counted``, the
    problems a manifest knows of were counted (or raised) at setup, and only decoding failures are reported.
    In DataLoader workers, batches are decoded into ``slots`` where given (:mod:`asr.data.transfer`).
    """

    def __init__(self, locations: Sequence[str], checks: Checks, on_error: str = "skip",
                 batch_size: int | None = None, max_batch_seconds: float | None = None,
                 buffer_size: int = 1000, seed: int = 0, rank: int = 0, world_size: int = 1,
                 batches_per_epoch: int | None = None, indexed: Mapping[str, IndexedRegions] | None = None,
                 counted: bool = False, slots: SharedSlots | None = None) -> None:
        self.locations = list(locations)
        self.slots = slots
        self.indexed = dict(indexed or {})
        self.counted = counted
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

    def _usable(self, shard: int, shards: int, pass_: int, skipped: list) -> Iterator[tuple[Utterance, bytes]]:
        training = self.batches_per_epoch is not None
        for location in self.locations:
            regions = self.indexed.get(location)
            if regions is None:
                records = read_archive(location, shard, shards)
            else:
                region = regions.shards.get(shard, [])
                if training:
                    region = region_from_a_start(region, self.seed, self.epoch, pass_, shard)
                records = read_members(location, regions.index_file, region)
            for record in records:
                problem = record if isinstance(record, Problem) else self.checks.problem(record[0], training)
                if problem is None:
                    yield record
                elif self.counted:
                    continue
                elif self.on_error == "raise":
                    raise DataError.of(problem)
                else:
                    skipped.append((problem.reason, problem.where))

    def _batches(self, shard: int, shards: int, pass_: int, skipped: list) -> Iterator[list[tuple]]:
        rng = None if self.batches_per_epoch is None else stream_rng(self.seed, self.epoch, pass_, shard)
        records = self._usable(shard, shards, pass_, skipped)
        return bucket_stream(records, _duration, self.batch_size, self.max_batch_seconds, self.buffer_size,
                             rng)

    def _collate(self, batch: list[tuple[Utterance, bytes]], skipped: list) -> dict:
        out = decode_batch(self.checks, [(utt, io.BytesIO(data)) for utt, data in batch], self.on_error,
                           self.slots, 0 if self.slots is None else self.slots.iteration, skipped)
        skipped.clear()
        return out

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
