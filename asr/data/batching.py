"""Duration-aware batch sampling that is deterministic, shards across ranks and can resume mid-epoch."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence

from torch.utils.data import Sampler


class DurationBatchSampler(Sampler[list[int]]):
    """Batches of similar-length utterances, by total padded seconds or by a fixed count.

    Utterances are sorted by duration (with a small random jitter when shuffling, so buckets change between
    epochs), cut into batches whose padded length ``len(batch) * longest`` stays within ``max_batch_seconds``
    (or that hold ``batch_size`` utterances), and the batch order is shuffled with ``seed + epoch``.
    Batch ``i`` goes to rank ``i % world_size``. For training (``drop_uneven=True``) the few batches that would
    leave ranks unequal are dropped for that epoch, so no rank waits at the end; for evaluation every
    utterance is kept and ranks may differ by one batch.
    """

    def __init__(
        self,
        durations: Sequence[float],
        batch_size: int | None = None,
        max_batch_seconds: float | None = None,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_uneven: bool = True,
    ) -> None:
        if (batch_size is None) == (max_batch_seconds is None):
            raise ValueError("set exactly one of batch_size and max_batch_seconds")
        too_long = [d for d in durations if max_batch_seconds is not None and d > max_batch_seconds]
        if too_long:
            raise ValueError(
                f"{len(too_long)} utterances are longer than max_batch_seconds={max_batch_seconds} "
                f"(longest {max(too_long):.1f}s): raise it or lower data.max_duration"
            )
        self.durations = list(durations)
        self.batch_size = batch_size
        self.max_batch_seconds = max_batch_seconds
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_uneven = drop_uneven
        self.epoch = 0
        self._start = 0  # where the next pass starts (set by load_state_dict)
        self._consumed = 0  # batches of this epoch handed out on this rank

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._start, self._consumed = epoch, 0, 0

    def _all_batches(self) -> list[list[int]]:
        rng = random.Random(self.seed + self.epoch)
        if self.shuffle:
            # Jitter of up to 10% keeps batches length-homogeneous while changing their members each epoch.
            order = sorted(range(len(self.durations)), key=lambda i: self.durations[i] * (1 + 0.1 * rng.random()))
        else:
            order = sorted(range(len(self.durations)), key=lambda i: self.durations[i])
        batches: list[list[int]] = []
        current: list[int] = []
        longest = 0.0
        for i in order:
            d = self.durations[i]
            full = (
                len(current) == self.batch_size
                if self.batch_size is not None
                else (len(current) + 1) * max(longest, d) > self.max_batch_seconds
            )
            if current and full:
                batches.append(current)
                current, longest = [], 0.0
            current.append(i)
            longest = max(longest, d)
        if current:
            batches.append(current)
        if self.shuffle:
            rng.shuffle(batches)
        if self.drop_uneven:
            batches = batches[: len(batches) - len(batches) % self.world_size]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        mine = self._all_batches()[self.rank :: self.world_size]
        # A resumed position applies to one pass only; consumers may stop early (Lightning stops at len()).
        start, self._start = self._start, 0
        for position in range(start, len(mine)):
            self._consumed = position + 1
            yield mine[position]

    def __len__(self) -> int:
        total = len(self._all_batches())
        if self.drop_uneven:
            return total // self.world_size
        return math.ceil(max(0, total - self.rank) / self.world_size)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "start": self._consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self._start = state["epoch"], state["start"]
