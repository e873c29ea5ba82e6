"""Batches' audio buffers, and their way out of DataLoader workers through shared memory set up once.

A tensor a worker sends the usual way costs a new shared-memory segment, the first touch of each of its pages,
and a file-descriptor handshake with the main process (a socket connection with HMAC authentication): on the
demo's batches of short clips, more than decoding them. :class:`SharedSlots` maps a few buffers per worker in the
main process before the workers start; a worker decodes a batch into a free one and sends only its place
(:class:`SlotRef`), and the main process copies the batch out and frees the slot.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Sampler, get_worker_info

LOCK_WAIT = 60.0  # seconds


def pcm_buffer(lengths: Sequence[int]) -> torch.Tensor:
    """Rows of 16-bit PCM to decode into, zero beyond each length (the rows themselves are left to the caller).

    16-bit PCM is what FLAC holds: half the bytes of float32 to pass between processes and to copy to the GPU.
    The buffer is ordinary heap memory, whose allocator hands the same, already mapped pages out again batch after
    batch (the first touch of a page is costly in a VM)."""
    pcm = torch.empty((len(lengths), max(lengths, default=0)), dtype=torch.int16)
    _zero_padding(pcm, lengths)
    return pcm


def _zero_padding(pcm: torch.Tensor, lengths: Sequence[int]) -> None:
    rows = pcm.numpy()  # numpy: torch's small multi-threaded ops are slow on a busy CPU
    for k, n in enumerate(lengths):
        rows[k, n:] = 0


@dataclass(frozen=True)
class SlotRef:
    """Where a worker left a batch's PCM: ``rows x columns`` samples at the start of its slot, the slot's
    ``write``-th batch."""

    worker: int
    slot: int
    write: int
    rows: int
    columns: int


class SharedSlots:
    """``per_worker`` buffers of ``samples`` 16-bit samples for each of ``workers`` DataLoader workers.

    Each slot has a mark: 0 when free, ``-i`` while a worker writes a batch of loader iteration ``i`` into it,
    ``i`` from when the batch is complete until the main process has copied it out. A slot that holds a complete
    batch of an earlier iteration is free too: DataLoader drops what an iteration left unread when the next
    begins. A batch that does not fit, or finds no free slot, goes the usual way. Each slot also counts the batches
    written into it, and a batch's :class:`SlotRef` carries its number: the main process refuses a batch whose slot
    was taken again since.

    A batch's iteration is the one it was asked for in, not the one under way when it is decoded: a persistent
    worker decodes what an abandoned iteration left in its queue after the next iteration began. A map-style
    dataset gets it with its indices (:class:`Tasks`), an iterable one as :attr:`iteration` when its
    workers start (each iteration starts them anew).
    """

    def __init__(self, workers: int, per_worker: int, samples: int) -> None:
        self.samples = samples
        self.pcm = torch.empty((workers, per_worker, samples), dtype=torch.int16).share_memory_()
        self.marks = torch.zeros((workers, per_worker), dtype=torch.int64).share_memory_()
        self.writes = torch.zeros((workers, per_worker), dtype=torch.int64).share_memory_()  # batches per slot
        self.iteration = 0  # in the main process: the iteration under way; in a worker: as when it started
        # Marks change under a lock, which also orders them with the copies on any CPU.
        self.lock = multiprocessing.get_context().Lock()
        self._next = 0  # in a worker: the slot it tries first
        # in a worker: (slot, iteration, write, its batch)
        self._taken: tuple[int, int, int, torch.Tensor] | None = None

    @contextmanager
    def _locked(self) -> Iterator[None]:
        # Held for microseconds: one that is not released was held by a process killed meanwhile.
        if not self.lock.acquire(timeout=LOCK_WAIT):
            raise RuntimeError(
                f"the lock of the DataLoader's shared batch slots was not released in {LOCK_WAIT} s: "
                "a process was killed while it held it"
            )
        try:
            yield
        finally:
            self.lock.release()

    def begin_iteration(self) -> None:
        """In the main process, before each iteration over the loader."""
        self.iteration += 1

    def buffer(self, lengths: Sequence[int], iteration: int) -> torch.Tensor:
        """Rows to decode into, zero beyond each length, for a batch of loader iteration ``iteration``: a free
        slot in a worker where the batch fits, else :func:`pcm_buffer`."""
        info = get_worker_info()
        rows, columns = len(lengths), max(lengths, default=0)
        if info is None or rows * columns > self.samples:
            return pcm_buffer(lengths)
        marks, per_worker = self.marks.numpy()[info.id], self.marks.shape[1]
        with self._locked():
            free = [k for k in range(per_worker) if 0 <= marks[k] < iteration]
            if not free:
                return pcm_buffer(lengths)
            slot = min(free, key=lambda k: (k - self._next) % per_worker)
            marks[slot] = -iteration
            writes = self.writes.numpy()[info.id]
            writes[slot] += 1
            write = int(writes[slot])
        self._next = (slot + 1) % per_worker
        pcm = self.pcm[info.id, slot, : rows * columns].view(rows, columns)
        self._taken = (slot, iteration, write, pcm)
        _zero_padding(pcm, lengths)
        return pcm

    def send(self, batch: dict) -> dict:
        """In a worker, after :meth:`buffer`: the batch with its PCM replaced by a :class:`SlotRef` if it is the
        slot's (a batch that lost utterances to decoding errors is a copy, and the slot is freed)."""
        if self._taken is None:
            return batch
        slot, iteration, write, pcm = self._taken
        if batch["input_values"] is not pcm:
            self.drop()
            return batch
        self._taken = None
        worker = get_worker_info().id
        with self._locked():
            self.marks.numpy()[worker, slot] = iteration
        return {**batch, "input_values": SlotRef(worker, slot, write, *pcm.shape)}

    def drop(self) -> None:
        """In a worker: frees the slot :meth:`buffer` handed out, for a batch that will not be sent from it."""
        if self._taken is not None:
            with self._locked():
                self.marks.numpy()[get_worker_info().id, self._taken[0]] = 0
            self._taken = None

    def receive(self, batch: dict, pin: bool = False) -> dict:
        """In the main process: the batch with its PCM copied out of its slot (into pinned memory with ``pin``),
        and the slot freed."""
        ref = batch["input_values"]
        if not isinstance(ref, SlotRef):
            return batch
        pcm = torch.empty((ref.rows, ref.columns), dtype=torch.int16, pin_memory=pin)
        np.copyto(pcm.numpy().reshape(-1), self.pcm[ref.worker, ref.slot, : ref.rows * ref.columns].numpy())
        marks = self.marks.numpy()
        with self._locked():
            if self.writes.numpy()[ref.worker, ref.slot] != ref.write:
                # Only another iteration's batch takes a slot whose batch is unread: two iterations at once.
                raise RuntimeError(
                    "a DataLoader batch was overwritten in shared memory: iterate over one loader at a time"
                )
            marks[ref.worker, ref.slot] = 0
        return {**batch, "input_values": pcm}


class Task(list):
    """What a DataLoader worker is asked for at once: batches (index lists), and the loader iteration they were
    drawn in."""

    def __init__(self, batches: Sequence[list[int]], iteration: int) -> None:
        super().__init__(batches)
        self.iteration = iteration


class Tasks(Sampler[Task]):
    """A batch sampler's batches, ``group`` to a task, each tagged when drawn (in the main process) with
    :attr:`SharedSlots.iteration` (0 without ``slots``). A task costs its worker and the main process the same in
    queues and pickling however much audio it holds: a task of several small batches spreads that over more."""

    def __init__(self, batches: Iterable[list[int]], slots: SharedSlots | None, group: int = 1) -> None:
        if group < 1:
            raise ValueError(f"a task holds at least one batch, not {group}")
        self.batches, self.slots, self.group = batches, slots, group

    def __len__(self) -> int:
        return math.ceil(len(self.batches) / self.group)

    def __iter__(self) -> Iterator[Task]:
        batches = iter(self.batches)
        while chunk := list(itertools.islice(batches, self.group)):
            yield Task(chunk, 0 if self.slots is None else self.slots.iteration)


def shared_memory_free() -> int | None:
    """Free bytes in ``/dev/shm``, where torch's shared memory lives on Linux; None where there is none."""
    try:
        stat = os.statvfs("/dev/shm")
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize
