"""Batches read in one pass from archive streams (iterable), sharded by rank and worker; and how many a training
shard yields."""

from __future__ import annotations

import io
import itertools
import random
from collections.abc import Collection, Iterator, Mapping, Sequence

from torch.utils.data import IterableDataset, get_worker_info

from asr.data.archive import IndexedRegions, cut_regions, read_archive, read_members
from asr.data.batching import Budget, bucket_stream
from asr.data.checks import Checks
from asr.data.dataset import decode_batch
from asr.data.librispeech import DataError, Problem, Utterance
from asr.data.transfer import SharedSlots


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


def stream_shard_count(
    utterances: Sequence[Utterance],
    shard: int,
    indexed: Collection[str],
    batch_size: int | None,
    max_batch_seconds: float | None,
    buffer_size: int,
    seed: int,
) -> int:
    """How many batches training stream shard ``shard`` yields from its ``utterances`` (of archives read by
    region where in ``indexed``) in the first pass of epoch 0."""
    ordered: list[Utterance] = []
    for location, group in itertools.groupby(utterances, key=lambda u: u.path):
        group = list(group)
        ordered += region_from_a_start(group, seed, 0, 0, shard) if location in indexed else group
    rng = stream_rng(seed, 0, 0, shard)
    return sum(1 for _ in bucket_stream(ordered, _duration, batch_size, max_batch_seconds, buffer_size, rng))


def stream_regions(
    shards: Sequence[Sequence[Utterance]], index_files: Mapping[str, str], rank: int, workers: int
) -> dict[str, IndexedRegions]:
    """This rank's stream shards' utterances in each indexed archive (the others' are left out)."""
    mine = range(rank * workers, (rank + 1) * workers) if shards else range(0)
    return {
        location: IndexedRegions(index_file, {s: [u for u in shards[s] if u.path == location] for s in mine})
        for location, index_file in index_files.items()
    }


def stream_batches(
    shards: Sequence[Sequence[Utterance]],
    index_files: Collection[str],
    budget: Budget,
    buffer_size: int,
    seed: int,
    workers: int,
    splits: Sequence[str],
) -> int:
    """Training batches per rank and epoch of a stream of ``splits``: what its leanest (rank, worker) shard yields,
    from the manifest, times the workers; so in epoch 0 no worker re-reads its shard."""
    leanest = min(
        stream_shard_count(utterances, shard, index_files, *budget, buffer_size, seed)
        for shard, utterances in enumerate(shards)
    )
    if leanest == 0:
        raise DataError(f"{list(splits)}: too few usable utterances for {len(shards)} stream shards")
    return leanest * workers


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

    def __init__(
        self,
        locations: Sequence[str],
        checks: Checks,
        on_error: str = "skip",
        batch_size: int | None = None,
        max_batch_seconds: float | None = None,
        buffer_size: int = 1000,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        batches_per_epoch: int | None = None,
        indexed: Mapping[str, IndexedRegions] | None = None,
        counted: bool = False,
        slots: SharedSlots | None = None,
    ) -> None:
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
                    skipped.append(problem)

    def _batches(self, shard: int, shards: int, pass_: int, skipped: list) -> Iterator[list[tuple]]:
        rng = None if self.batches_per_epoch is None else stream_rng(self.seed, self.epoch, pass_, shard)
        records = self._usable(shard, shards, pass_, skipped)
        return bucket_stream(records, _duration, self.batch_size, self.max_batch_seconds, self.buffer_size, rng)

    def _collate(self, batch: list[tuple[Utterance, bytes]], skipped: list) -> dict:
        out = decode_batch(
            self.checks,
            [(utt, io.BytesIO(data)) for utt, data in batch],
            self.on_error,
            self.slots,
            0 if self.slots is None else self.slots.iteration,
            skipped,
        )
        skipped.clear()
        return out

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers = info.num_workers if info is not None else 1
        # The DataLoader asks its workers in turn from worker 0: after resuming at batch ``start``, worker 0
        # plays the part of the worker that owns that batch, and so on, so that batches keep their order.
        worker = ((info.id if info is not None else 0) + self.start) % workers
        shard, shards = self.rank * workers + worker, self.world_size * workers
        skipped: list[Problem] = []
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
