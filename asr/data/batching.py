"""Duration-bucketed batching: a sampler over a manifest (deterministic), its share for each rank (resumable),
bucketing of a stream within a bounded buffer, and how well batches are padded."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple, TypeVar

from torch.utils.data import Sampler

T = TypeVar("T")

# Shuffling moves each utterance at most this fraction of the utterances away from its place in the duration
# order: batch members change every epoch while durations within a batch stay close.
SHUFFLE_WINDOW = 0.01


class Budget(NamedTuple):
    """How big a batch is: ``batch_size`` utterances, or at most ``max_batch_seconds`` of padded audio (the other
    is None)."""

    batch_size: int | None
    max_batch_seconds: float | None


def cut_batches(
    order: Sequence[int], durations: Sequence[float], batch_size: int | None, max_batch_seconds: float | None
) -> list[list[int]]:
    """Cut ``order`` (indices, by increasing duration) into batches of ``batch_size`` utterances or of at most
    ``max_batch_seconds`` padded seconds (``len(batch) * longest``); an utterance longer than that is a batch of
    its own (training leaves such utterances out beforehand, evaluation keeps every one)."""
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0.0
    for i in order:
        d = durations[i]
        if batch_size is not None:
            full = len(current) == batch_size
        else:
            full = (len(current) + 1) * max(longest, d) > max_batch_seconds
        if current and full:
            batches.append(current)
            current, longest = [], 0.0
        current.append(i)
        longest = max(longest, d)
    if current:
        batches.append(current)
    return batches


def _check_budget(batch_size: int | None, max_batch_seconds: float | None) -> None:
    if (batch_size is None) == (max_batch_seconds is None):
        raise ValueError("set exactly one of batch_size and max_batch_seconds")


class DurationBatchSampler(Sampler[list[int]]):
    """An epoch's batches of similar-length utterances, by total padded seconds or by a fixed count.

    Utterances are ordered by duration (shuffled within a ``SHUFFLE_WINDOW`` when shuffling), cut into
    batches, and the batch order is shuffled with ``seed + epoch``.
    Where the cut is shuffled, its batch count varies by a batch or two from epoch to epoch; every epoch is given
    epoch 0's count instead (Lightning reads ``len()`` once, and schedules by it): surplus batches are left out,
    and a shortfall is made up with the epoch's first batches again.
    """

    def __init__(
        self,
        durations: Sequence[float],
        batch_size: int | None = None,
        max_batch_seconds: float | None = None,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        _check_budget(batch_size, max_batch_seconds)
        self.durations = list(durations)
        self.batch_size = batch_size
        self.max_batch_seconds = max_batch_seconds
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.batches_per_epoch = len(self._cut(random.Random(seed)))  # epoch 0's

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _cut(self, rng: random.Random) -> list[list[int]]:
        order = sorted(range(len(self.durations)), key=self.durations.__getitem__)
        if self.shuffle:
            window = SHUFFLE_WINDOW * len(order)
            keys = [(place + window * rng.random(), i) for place, i in enumerate(order)]
            order = [i for _, i in sorted(keys)]
        return cut_batches(order, self.durations, self.batch_size, self.max_batch_seconds)

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(self.seed + self.epoch)
        batches = self._cut(rng)
        if self.shuffle:
            rng.shuffle(batches)
        return itertools.islice(itertools.cycle(batches), self.batches_per_epoch)

    def __len__(self) -> int:
        return self.batches_per_epoch


class DistributedBatchSampler(Sampler[list[int]]):
    """This rank's share of a batch sampler's epoch: batch ``i`` goes to rank ``i % world_size``.

    For training (``drop_uneven=True``) the few batches that would leave ranks unequal are dropped for that epoch,
    so no rank waits at the end; for evaluation every batch is kept, and a rank short of a batch gets an empty one:
    Lightning skips evaluation on a rank with no batches, and its metrics' sync with it, which would leave the other
    ranks waiting. ``set_epoch(epoch, start)`` makes the passes that follow begin at batch ``start`` of that epoch (a
    resumed run); ``len()`` stays the epoch's full count.
    """

    def __init__(
        self, batches: DurationBatchSampler, rank: int = 0, world_size: int = 1, drop_uneven: bool = True
    ) -> None:
        self.batches = batches
        self.rank, self.world_size = rank, world_size
        self.drop_uneven = drop_uneven
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _kept(self) -> int:
        count = len(self.batches)
        return count - count % self.world_size if self.drop_uneven else count

    def __iter__(self) -> Iterator[list[int]]:
        self.batches.set_epoch(self.epoch)
        everyone = list(itertools.islice(self.batches, self._kept()))
        mine = everyone[self.rank :: self.world_size]
        mine += [[] for _ in range(len(self) - len(mine))]
        yield from mine[self.start :]

    def __len__(self) -> int:
        return math.ceil(self._kept() / self.world_size)


# In a stream, a batch padded worse than this waits in the buffer for utterances of similar length (while
# they take up at most half of it).
STREAM_MIN_EFFICIENCY = 0.97


def bucket_stream(
    items: Iterable[T],
    duration: Callable[[T], float],
    batch_size: int | None,
    max_batch_seconds: float | None,
    buffer_size: int,
    rng: random.Random | None = None,
) -> Iterator[list[T]]:
    """Batches of similar-length items from a stream: fill a buffer, sort it, cut it into batches, emit them
    (see ``STREAM_MIN_EFFICIENCY`` for those that wait).

    With ``rng`` (training) the buffer is emptied at a random fill between half and all of ``buffer_size``, so
    batches differ between epochs, and its batches come out in random order; without, shortest first.
    """
    _check_budget(batch_size, max_batch_seconds)

    def limit() -> int:
        return rng.randint(max(1, buffer_size // 2), buffer_size) if rng else buffer_size

    def flush(buffer: list[T], final: bool) -> tuple[list[list[T]], list[T]]:
        durations = [duration(item) for item in buffer]
        order = sorted(range(len(buffer)), key=durations.__getitem__)
        batches = cut_batches(order, durations, batch_size, max_batch_seconds)
        waiting: list[int] = []
        if not final:
            ready = []
            for batch in batches:
                padded = len(batch) * max(durations[i] for i in batch)
                good = sum(durations[i] for i in batch) >= STREAM_MIN_EFFICIENCY * padded
                if good:
                    ready.append(batch)
                else:
                    waiting.extend(batch)
            if len(waiting) <= buffer_size // 2:
                batches = ready
            else:
                waiting = []
        if rng:
            rng.shuffle(batches)
        return [[buffer[i] for i in batch] for batch in batches], [buffer[i] for i in waiting]

    buffer: list[T] = []
    size = limit()
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            batches, buffer = flush(buffer, final=False)
            yield from batches
            size = limit()
    if buffer:
        yield from flush(buffer, final=True)[0]


def efficiency(batches: Sequence[Sequence[int]], durations: Sequence[float]) -> float:
    """Padding efficiency: the audio in ``batches`` (of indices into ``durations``) over their padded length."""
    real = sum(durations[i] for batch in batches for i in batch)
    return real / sum(len(batch) * max(durations[i] for i in batch) for batch in batches)
