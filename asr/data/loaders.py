"""DataLoaders of speech batches: how batches travel from the workers (:class:`WorkerTransport`: tasks of several
batches, shared-memory slots), and where a training pass starts (:class:`TrainingPosition`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from asr.data.batching import Budget
from asr.data.checks import Checks
from asr.data.transfer import SharedSlots, Tasks, shared_memory_free

log = logging.getLogger(__name__)


def as_is(batch: dict) -> dict:
    """The ``collate_fn`` of datasets that make whole batches."""
    return batch


class SpeechLoader(DataLoader):
    """A DataLoader whose workers get a map-style dataset's batches ``group`` to a task (:class:`Tasks`), and
    send their audio through shared slots (:mod:`asr.data.transfer`); it yields batch by batch. Its training
    passes start where ``position`` says (epoch, batches to skip): Lightning tells the epoch only to plain
    samplers, and a resumed run must skip the batches it has already trained on."""

    def __init__(
        self,
        dataset: Dataset,
        *,
        batch_sampler: Sampler | None = None,
        group: int = 1,
        position: Callable[[], tuple[int, int]] | None = None,
        **kwargs,
    ) -> None:
        self.slots: SharedSlots | None = getattr(dataset, "slots", None)
        self.resumable = dataset if batch_sampler is None else batch_sampler
        if batch_sampler is not None:
            batch_sampler = Tasks(batch_sampler, self.slots, group)
        elif self.slots is not None and (not isinstance(dataset, IterableDataset) or kwargs.get("persistent_workers")):
            raise ValueError(
                "shared batch slots need each batch's loader iteration: from a batch sampler, or from "
                "workers started anew for each iteration (an iterable dataset without persistent_workers)"
            )
        super().__init__(dataset, batch_sampler=batch_sampler, collate_fn=as_is, **kwargs)
        self.position = position

    def __len__(self) -> int:
        return len(self.resumable) if isinstance(self.batch_sampler, Tasks) else super().__len__()

    def __iter__(self) -> Iterator:
        if self.position is not None:
            self.resumable.set_epoch(*self.position())
        if self.slots is not None:
            self.slots.begin_iteration()
        batches = super().__iter__()
        if isinstance(self.batch_sampler, Tasks):
            batches = (batch for task in batches for batch in task)
        if self.slots is None:
            return batches
        pin = self.pin_memory and torch.accelerator.is_available()  # as DataLoader decides
        return (self.slots.receive(batch, pin) for batch in batches)


@dataclass
class WorkerTransport:
    """How batches go from DataLoader workers to the main process: ``num_workers`` workers, each preparing
    ``prefetch_factor`` tasks ahead (None: the DataLoader's default, 2), a task holding as many batches as hold
    ``task_seconds`` of audio (None: one), their audio decoded into shared slots set up once (as long as they take at
    most half the free space of ``/dev/shm``); batches pinned for the copy to the GPU with ``pin_memory`` (None:
    when CUDA is available)."""

    num_workers: int = 4
    pin_memory: bool | None = None
    prefetch_factor: int | None = None
    task_seconds: float | None = 60.0

    def __post_init__(self) -> None:
        if self.task_seconds is not None and self.task_seconds <= 0:
            raise ValueError(f"data.task_seconds must be positive (or null: a batch per task), not {self.task_seconds}")
        if self.pin_memory is None:
            self.pin_memory = torch.cuda.is_available()

    def options(self) -> dict:
        # Without workers nothing is prefetched, and DataLoader refuses a prefetch_factor.
        prefetch_factor = self.prefetch_factor if self.num_workers > 0 else None
        return dict(num_workers=self.num_workers, pin_memory=self.pin_memory, prefetch_factor=prefetch_factor)

    def group(self, durations: Sequence[float], budget: Budget, samples: int | None) -> int:
        """Batches per worker task, of utterances of ``durations``: as many as hold ``task_seconds`` of audio (at
        least one), and no more than their slots of ``samples`` each leave room for in ``/dev/shm``."""
        if self.num_workers == 0 or self.task_seconds is None or not durations:
            return 1
        if budget.batch_size is None:
            seconds = budget.max_batch_seconds
        else:
            seconds = budget.batch_size * sum(durations) / len(durations)
        group = max(1, int(self.task_seconds / seconds))
        free = shared_memory_free()
        if samples is not None and free is not None:  # smaller tasks rather than no slots
            group = max(1, min(group, int(free / 2 / self._slot_bytes(samples, 1))))
        return group

    def slots(self, samples: int | None, group: int = 1) -> SharedSlots | None:
        """Shared slots of ``samples`` for the workers' batches (:meth:`_slots_per_worker`), unless they would
        take over half of the free space in ``/dev/shm``. (A stream's last busy worker may be asked for more
        batches than it has slots for, which then go the usual way.)"""
        if self.num_workers == 0 or samples is None:
            return None
        size, free = self._slot_bytes(samples, group), shared_memory_free()
        if free is not None and size > free / 2:
            log.warning(
                "batches go from DataLoader workers the usual way: their shared slots (%.1f MB) would take "
                "over half of the %.1f MB free in /dev/shm",
                size / 1e6,
                free / 1e6,
            )
            return None
        return SharedSlots(self.num_workers, self._slots_per_worker(group), samples)

    def _slots_per_worker(self, group: int) -> int:
        """A slot for each batch of the tasks a worker may have in flight (``prefetch_factor`` tasks of ``group``
        batches) and of one more, the task the main process takes its batches from."""
        return ((self.prefetch_factor or 2) + 1) * group

    def _slot_bytes(self, samples: int, group: int) -> int:
        return self.num_workers * self._slots_per_worker(group) * samples * 2


def slot_samples(checks: Checks, budget: Budget, longest: float | None) -> int | None:
    """A slot's samples: as many as a batch of ``budget`` can hold with utterances of up to ``longest`` seconds
    (None: unknown, and no slots)."""
    if budget.batch_size is not None:
        seconds = None if longest is None else budget.batch_size * longest
    else:
        seconds = max(budget.max_batch_seconds, longest or 0.0)
    if seconds is None:
        return None
    samples = math.ceil(seconds * checks.sample_rate)
    if checks.resample:  # a resampled row may be a sample longer than its duration says
        samples += math.ceil(samples / max(1, checks.min_samples))
    return samples


@dataclass
class TrainingPosition:
    """Where training stands on this rank, as on every rank: the epoch, and its batches received (what a resumed
    run skips)."""

    epoch: int = 0
    batches: int = 0

    def next_pass(self, current_epoch: int) -> tuple[int, int]:
        """(epoch, batches to skip) for a training pass starting in Lightning's ``current_epoch``. A position
        restored from an end-of-epoch checkpoint is ahead of it until Lightning's loop catches up."""
        self._enter(max(current_epoch, self.epoch))
        return self.epoch, self.batches

    def received(self, epoch: int) -> None:
        self._enter(epoch)
        self.batches += 1

    def _enter(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.batches = epoch, 0

    def state_dict(self, epoch_length: int | None) -> dict[str, int]:
        """The position; once all ``epoch_length`` batches of the epoch are received, the next epoch's start."""
        if epoch_length is not None and self.batches >= epoch_length:
            return {"epoch": self.epoch + 1, "batches": 0}
        return {"epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])
