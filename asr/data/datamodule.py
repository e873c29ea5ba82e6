"""The LightningDataModule: LibriSpeech (folders or streamed archives) or the demo corpus in;
duration-bucketed batches out, as many on every rank, resumable mid-epoch."""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from asr.data import hf
from asr.data.archive import IndexedRegions, is_archive
from asr.data.batching import DurationBatchSampler
from asr.data.dataset import Checks, SpeechDataset, StreamDataset, model_inputs, stream_shard_count, stream_shards
from asr.data.demo import DemoCorpusConfig, build_demo_corpus
from asr.data.librispeech import DataError, Problem, Utterance, apply_policy, locate, parts
from asr.data.manifest import Manifest, load_manifest
from asr.data.text import CharTokenizer
from asr.data.transfer import SharedSlots, Tasks, shared_memory_free

log = logging.getLogger(__name__)


def _as_is(batch: dict) -> dict:
    return batch


def _longest(utterances: list[Utterance]) -> float:
    return max((u.duration for u in utterances), default=0.0)


class SpeechLoader(DataLoader):
    """A DataLoader whose workers get a map-style dataset's batches ``group`` to a task (:class:`Tasks`), and
    send their audio through shared slots (:mod:`asr.data.transfer`); it yields batch by batch. Its training
    passes start where the DataModule says (``position``): Lightning tells the epoch only to plain samplers,
    and a resumed run must skip the batches it has already trained on."""

    def __init__(self, dataset: Dataset, *, batch_sampler: Sampler | None = None, group: int = 1,
                 position: Callable[[], tuple[int, int]] | None = None, **kwargs) -> None:
        self.slots: SharedSlots | None = getattr(dataset, "slots", None)
        self.resumable = dataset if batch_sampler is None else batch_sampler
        if batch_sampler is not None:
            batch_sampler = Tasks(batch_sampler, self.slots, group)
        elif self.slots is not None and (not isinstance(dataset, IterableDataset) or kwargs.get("persistent_workers")):
            raise ValueError("shared batch slots need each batch's loader iteration: from a batch sampler, or from "
                             "workers started anew for each iteration (an iterable dataset without persistent_workers)")
        super().__init__(dataset, batch_sampler=batch_sampler, **kwargs)
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


class SpeechDataModule(L.LightningDataModule):
    def __init__(
        self,
        root: str,
        train_splits: list[str],
        val_splits: list[str],
        test_splits: list[str],
        tokenizer: CharTokenizer,
        batch_size: int | None = None,
        max_batch_seconds: float | None = None,
        eval_batch_size: int | None = None,
        eval_max_batch_seconds: float | None = None,
        min_duration: float | None = None,
        max_duration: float | None = None,
        num_workers: int = 4,
        pin_memory: bool | None = None,
        prefetch_factor: int | None = None,
        task_seconds: float | None = 60.0,
        seed: int = 0,
        on_error: str = "skip",
        resample: bool = False,
        min_samples: int = 400,
        frames_per_second: float = 50.0,
        archive_url: str | None = None,
        hf_dataset: str | None = None,
        manifest_dir: str | None = None,
        scan_workers: int = 8,
        shuffle_buffer: int = 1000,
        batches_per_epoch: int | None = None,
        demo_corpus: dict | None = None,
    ) -> None:
        super().__init__()
        if on_error not in ("raise", "skip"):
            raise ValueError(f"data.on_error must be 'raise' or 'skip', not {on_error!r}")
        if task_seconds is not None and task_seconds <= 0:
            raise ValueError(f"data.task_seconds must be positive (or null: a batch per task), not {task_seconds}")
        self.root = root
        self.train_splits, self.val_splits, self.test_splits = train_splits, val_splits, test_splits
        self.tokenizer = tokenizer
        self.batch_size, self.max_batch_seconds = batch_size, max_batch_seconds
        self.eval_batch_size, self.eval_max_batch_seconds = eval_batch_size, eval_max_batch_seconds
        self.checks = Checks(tokenizer, resample=resample, min_samples=min_samples,
                             frames_per_second=frames_per_second, min_duration=min_duration,
                             max_duration=max_duration, max_batch_seconds=max_batch_seconds)
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.prefetch_factor = prefetch_factor
        self.task_seconds = task_seconds
        self.seed = seed
        self.on_error = on_error
        self.archive_url = archive_url
        self.hf_dataset = hf_dataset
        self.manifest_dir = Path(manifest_dir or Path(root) / "manifests").expanduser()
        self.scan_workers = scan_workers
        self.shuffle_buffer = shuffle_buffer
        self.batches_per_epoch = batches_per_epoch
        self.demo_corpus = DemoCorpusConfig(**demo_corpus) if demo_corpus is not None else None
        # "<split>/<reason>" -> where the unusable utterances are: found at setup, or while decoding in any
        # epoch or pass; each counted once
        self._skips: dict[str, set[str]] = defaultdict(set)
        self._utterances: dict[str, list[Utterance]] = {}  # split -> usable for evaluation
        self._train_utterances: dict[str, list[Utterance]] = {}  # split -> usable for training
        self._index_files: dict[str, str] = {}  # archives read by region -> their gzip index
        self._train_loader: DataLoader | None = None
        self._position = {"epoch": 0, "batches": 0}  # training batches this rank has received in that epoch
        self._epoch_skips: Counter = Counter()
        self._skip_examples: dict[str, str] = {}
        self._skip_key: tuple[str, int] | None = None

    def locations(self, split: str) -> list[str]:
        if self.hf_dataset:
            return [hf.location(self.hf_dataset, part) for part in parts(split)]
        return [locate(self.root, part, self.archive_url) for part in parts(split)]

    def is_stream(self, splits: list[str]) -> bool:
        """Whether these splits come from archives (streamed) rather than folders (random access)."""
        kinds = {is_archive(location) for split in splits for location in self.locations(split)}
        if len(kinds) > 1:
            raise ValueError(f"{splits} mix extracted folders and archives; extract all of them or none")
        return kinds == {True}

    def manifest(self, split: str, verify: bool = False) -> list[Manifest]:
        """The manifests of a split's parts, scanned once and cached in ``manifest_dir``."""
        return [load_manifest(location, self.manifest_dir / f"{part}.json", self.scan_workers, verify)
                for part, location in zip(parts(split), self.locations(split), strict=True)]

    def load_split(self, split: str, for_training: bool,
                   manifests: list[Manifest] | None = None) -> tuple[list[Utterance], list[Problem]]:
        """The usable utterances of a split, from its manifests, and the problems of the others; under
        ``on_error="raise"`` the first problem raises a :class:`DataError` instead."""
        utterances, problems = [], []
        for manifest in manifests or self.manifest(split):
            problems += apply_policy(manifest.problems, self.on_error)
            usable, unusable = self._usable(manifest.utterances, for_training)
            utterances += usable
            problems += unusable
        return utterances, problems

    def _usable(self, utterances: list[Utterance], for_training: bool) -> tuple[list[Utterance], list[Problem]]:
        usable, problems = [], []
        for utt in utterances:
            problem = self.checks.problem(utt, for_training)
            if problem is None:
                usable.append(utt)
            else:
                problems += apply_policy([problem], self.on_error)
        return usable, problems

    @property
    def skipped(self) -> Counter:
        """Unusable utterances by ``"<split>/<reason>"``: counted at setup or when decoding, each one once however
        many epochs and validation passes read it."""
        return Counter({key: len(where) for key, where in self._skips.items()})

    def _all_splits(self) -> list[str]:
        return list(dict.fromkeys([*self.train_splits, *self.val_splits, *self.test_splits]))

    def _scanned(self, split: str) -> bool:
        """Whether a split has a manifest: all do but archives trained on with ``batches_per_epoch`` set."""
        return self.batches_per_epoch is None or split not in self.train_splits or not self.is_stream([split])

    def prepare_data(self) -> None:
        """Build the demo corpus if configured, and scan the manifests that are missing or out of date (once
        per node)."""
        if self.demo_corpus is not None:
            build_demo_corpus(self.root, self.demo_corpus)
        for split in self._all_splits():
            if self._scanned(split):
                self.manifest(split, verify=True)

    def setup(self, stage: str | None = None) -> None:
        """From each split's manifest: for evaluation every utterance the model can encode, and for training those
        it can use (duration limits, CTC length), so that a split both trained and evaluated on is evaluated
        whole; and the gzip indexes of archives, to read them by region. Archives without a manifest are streamed
        whole, and report their problems as they meet them."""
        wanted = {"fit": self.train_splits + self.val_splits, "validate": self.val_splits,
                  "test": self.test_splits}
        for split in wanted.get(stage, self._all_splits()):
            training, evaluated = split in self.train_splits, split in self.val_splits + self.test_splits
            needed = (evaluated and split not in self._utterances) or (
                training and split not in self._train_utterances)
            if not (needed and self._scanned(split)):
                continue
            manifests = self.manifest(split)
            self._index_files.update({m.source: m.index_file for m in manifests if m.index_file is not None})
            if evaluated and split not in self._utterances:
                self._keep(split, False, *self.load_split(split, False, manifests))
                self._warn_alone(split)
            if training and split not in self._train_utterances:
                if evaluated:  # training's checks on what evaluation keeps: nothing counted twice
                    self._keep(split, True, *self._usable(self._utterances[split], for_training=True))
                else:
                    self._keep(split, True, *self.load_split(split, True, manifests))

    def _warn_alone(self, split: str) -> None:
        budget = self.eval_max_batch_seconds
        longer = [u for u in self._utterances[split] if budget is not None and u.duration > budget]
        if longer:
            log.warning("%s: %d utterances longer than data.eval_max_batch_seconds=%s are batched alone (longest "
                        "%.1f s)", split, len(longer), budget, max(u.duration for u in longer))

    def _keep(self, split: str, training: bool, utterances: list[Utterance], problems: list[Problem]) -> None:
        role = "training" if training else "evaluation"
        skipped = Counter(p.reason for p in problems)
        if not utterances:
            raise DataError(f"{split}: no utterances usable for {role} in {self.locations(split)}, "
                            f"{dict(skipped)}")
        if skipped:
            log.warning("%s: %d utterances for %s, skipped %s", split, len(utterances), role, dict(skipped))
        for problem in problems:
            self._skips[f"{split}/{problem.reason}"].add(problem.where)
        (self._train_utterances if training else self._utterances)[split] = utterances

    def _rank_and_world(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)

    def _next_pass(self) -> tuple[int, int]:
        """(epoch, batches to skip) for a training pass starting now. A position restored from an end-of-epoch
        checkpoint is ahead of ``trainer.current_epoch`` until Lightning's loop catches up."""
        epoch = max(self.trainer.current_epoch if self.trainer else 0, self._position["epoch"])
        if epoch != self._position["epoch"]:
            self._position = {"epoch": epoch, "batches": 0}
        return epoch, self._position["batches"]

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_and_world()
        options = dict(self._loader_options(), position=self._next_pass)
        if self.is_stream(self.train_splits):
            self._train_loader = SpeechLoader(self._train_stream(rank, world), batch_size=None, collate_fn=_as_is,
                                              **options)
        else:
            utterances = [u for split in self.train_splits for u in self._train_utterances[split]]
            self._train_loader = self._folder_loader(utterances, self.batch_size, self.max_batch_seconds, True,
                                                     options)
        return self._train_loader

    def _folder_loader(self, utterances: list[Utterance], batch_size: int | None, max_batch_seconds: float | None,
                       training: bool, options: dict) -> SpeechLoader:
        """This rank's duration-bucketed batches of utterances in files (shuffled, and as many as every other
        rank's, in training), handed to the workers in tasks of :meth:`_group` batches."""
        rank, world = self._rank_and_world()
        sampler = DurationBatchSampler([u.duration for u in utterances], batch_size, max_batch_seconds,
                                       shuffle=training, seed=self.seed, rank=rank, world_size=world,
                                       drop_uneven=training)
        group = self._group(utterances, batch_size, max_batch_seconds)
        slots = self._slots(_longest(utterances), batch_size, max_batch_seconds, group)
        return SpeechLoader(SpeechDataset(utterances, self.checks, self.on_error, slots), batch_sampler=sampler,
                            group=group, collate_fn=_as_is, persistent_workers=self.num_workers > 0, **options)

    def _loader_options(self) -> dict:
        # Without workers nothing is prefetched, and DataLoader refuses a prefetch_factor.
        prefetch_factor = self.prefetch_factor if self.num_workers > 0 else None
        return dict(num_workers=self.num_workers, pin_memory=self.pin_memory, prefetch_factor=prefetch_factor)

    def _group(self, utterances: list[Utterance], batch_size: int | None, max_batch_seconds: float | None) -> int:
        """Batches per worker task: as many as hold ``task_seconds`` of audio (at least one), and no more than
        their slots leave room for in ``/dev/shm`` (see :meth:`_slots`)."""
        if self.num_workers == 0 or self.task_seconds is None or not utterances:
            return 1
        if batch_size is None:
            seconds = max_batch_seconds
        else:
            seconds = batch_size * sum(u.duration for u in utterances) / len(utterances)
        group = max(1, int(self.task_seconds / seconds))
        samples, free = self._slot_samples(_longest(utterances), batch_size, max_batch_seconds), shared_memory_free()
        if samples is not None and free is not None:  # smaller tasks rather than no slots
            group = max(1, min(group, int(free / 2 / self._slot_bytes(samples, 1))))
        return group

    def _slot_samples(self, longest: float | None, batch_size: int | None,
                      max_batch_seconds: float | None) -> int | None:
        """A slot's samples: as many as a batch can hold with utterances of up to ``longest`` seconds (None:
        unknown, and no slots)."""
        if batch_size is not None:
            seconds = None if longest is None else batch_size * longest
        else:
            seconds = max(max_batch_seconds, longest or 0.0)
        if seconds is None:
            return None
        samples = math.ceil(seconds * self.checks.sample_rate)
        if self.checks.resample:  # a resampled row may be a sample longer than its duration says
            samples += math.ceil(samples / max(1, self.checks.min_samples))
        return samples

    def _slots_per_worker(self, group: int) -> int:
        """A slot for each batch of the tasks a worker may have in flight (``prefetch_factor`` tasks of ``group``
        batches) and of one more, the task the main process takes its batches from."""
        return ((self.prefetch_factor or 2) + 1) * group

    def _slot_bytes(self, samples: int, group: int) -> int:
        return self.num_workers * self._slots_per_worker(group) * samples * 2

    def _slots(self, longest: float | None, batch_size: int | None, max_batch_seconds: float | None,
               group: int = 1) -> SharedSlots | None:
        """Shared slots for the workers' batches (:meth:`_slot_samples`, :meth:`_slots_per_worker`), unless they
        would take over half of the free space in ``/dev/shm``. (A stream's last busy worker may be asked for more
        batches than it has slots for, which then go the usual way.)"""
        samples = self._slot_samples(longest, batch_size, max_batch_seconds)
        if self.num_workers == 0 or samples is None:
            return None
        size, free = self._slot_bytes(samples, group), shared_memory_free()
        if free is not None and size > free / 2:
            log.warning("batches go from DataLoader workers the usual way: their shared slots (%.1f MB) would take "
                        "over half of the %.1f MB free in /dev/shm", size / 1e6, free / 1e6)
            return None
        return SharedSlots(self.num_workers, self._slots_per_worker(group), samples)

    def _longest_trained(self) -> float | None:
        """The longest utterance training keeps, by its limits (for a stream without a manifest)."""
        return min((s for s in (self.checks.max_duration, self.max_batch_seconds) if s is not None), default=None)

    def _train_stream(self, rank: int, world: int) -> StreamDataset:
        """With a manifest, each shard's utterances are known: indexed archives are read by region (this rank's
        shards' regions go to the dataset), and the batches per epoch are counted from the leanest shard."""
        workers = max(1, self.num_workers)
        shards: list[list[Utterance]] = []
        utterances = None
        if self.batches_per_epoch is None:
            utterances = [u for split in self.train_splits for u in self._train_utterances[split]]
            shards = stream_shards(utterances, world * workers, self._index_files)
        return StreamDataset(
            [location for split in self.train_splits for location in self.locations(split)], self.checks,
            self.on_error, self.batch_size, self.max_batch_seconds, self.shuffle_buffer, self.seed, rank, world,
            self.batches_per_epoch or self._stream_batches(shards, workers), self._regions(shards, rank, workers),
            counted=self.batches_per_epoch is None,
            slots=self._slots(self._longest_trained() if utterances is None else _longest(utterances),
                              self.batch_size, self.max_batch_seconds),
        )

    def _regions(self, shards: list[list[Utterance]], rank: int, workers: int) -> dict[str, IndexedRegions]:
        """This rank's stream shards' utterances in each indexed archive (the others' are left out)."""
        mine = range(rank * workers, (rank + 1) * workers) if shards else range(0)
        return {location: IndexedRegions(index_file, {s: [u for u in shards[s] if u.path == location] for s in mine})
                for location, index_file in self._index_files.items()}

    def _stream_batches(self, shards: list[list[Utterance]], workers: int) -> int:
        """Batches per rank and epoch of a streamed train split: what its leanest (rank, worker) shard yields,
        from the manifest, times the workers; so in epoch 0 no worker re-reads its shard."""
        leanest = min(stream_shard_count(utterances, shard, self._index_files, self.batch_size,
                                         self.max_batch_seconds, self.shuffle_buffer, self.seed)
                      for shard, utterances in enumerate(shards))
        if leanest == 0:
            raise DataError(f"{self.train_splits}: too few usable utterances for {len(shards)} stream shards")
        return leanest * workers

    def _eval_loaders(self, splits: list[str]) -> list[DataLoader]:
        rank, world = self._rank_and_world()
        batch_size = self.eval_batch_size if self.eval_max_batch_seconds is None else None
        options = self._loader_options()
        loaders = []
        for split in splits:
            if self.is_stream([split]):
                scanned = split in self._utterances  # read by region where indexed; problems counted at setup
                workers = max(1, self.num_workers)
                regions = {}
                if scanned:
                    shards = stream_shards(self._utterances[split], world * workers, self._index_files)
                    regions = self._regions(shards, rank, workers)
                longest = _longest(self._utterances[split]) if scanned else None
                slots = self._slots(longest, batch_size, self.eval_max_batch_seconds)
                dataset = StreamDataset(self.locations(split), self.checks, self.on_error, batch_size,
                                        self.eval_max_batch_seconds, self.shuffle_buffer, rank=rank,
                                        world_size=world, indexed=regions, counted=scanned, slots=slots)
                loaders.append(SpeechLoader(dataset, batch_size=None, collate_fn=_as_is, **options))
            else:
                loaders.append(self._folder_loader(self._utterances[split], batch_size, self.eval_max_batch_seconds,
                                                   False, options))
        return loaders

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self.val_splits)

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self.test_splits)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Make the model's inputs on the device; count the training batches this rank received (its resume
        position), and decoding skips."""
        batch = model_inputs(batch)
        stage = getattr(self.trainer.state.stage, "value", None) if self.trainer else "train"
        epoch = self.trainer.current_epoch if self.trainer else self._position["epoch"]
        if stage == "train":
            if epoch != self._position["epoch"]:
                self._position = {"epoch": epoch, "batches": 0}
            self._position["batches"] += 1
        if (stage, epoch) != self._skip_key:
            self._log_skips()
            self._skip_key = (stage, epoch)
        if batch.get("skipped"):
            if stage == "train":
                splits = self.train_splits
            else:
                splits = [(self.test_splits if stage == "test" else self.val_splits)[dataloader_idx]]
            for reason, where in batch["skipped"]:
                split = self._split_of(where, splits)
                self._epoch_skips[f"{split}/{reason}"] += 1
                self._skips[f"{split}/{reason}"].add(where)
                self._skip_examples.setdefault(reason, where)
        return batch

    def _split_of(self, where: str, splits: list[str]) -> str:
        """Which of ``splits`` the utterance at ``where`` (a file under a split's folder, or an archive member or
        row: ``<location>:...``) is in: so that a training skip and an evaluation one of the same utterance have
        the same key."""
        for split in splits:
            if any(where.startswith((f"{location}/", f"{location}:")) for location in self.locations(split)):
                return split
        return "+".join(splits)

    def _log_skips(self) -> None:
        """Log the decoding skips of the stage and epoch that just ended."""
        if not self._epoch_skips:
            return
        stage, epoch = self._skip_key
        examples = "; ".join(f"{reason}: {where}" for reason, where in self._skip_examples.items())
        log.warning("%s, epoch %d: skipped %d utterances while decoding: %s (e.g. %s)", stage, epoch,
                    sum(self._epoch_skips.values()), dict(self._epoch_skips), examples)
        self._epoch_skips.clear()
        self._skip_examples.clear()

    def teardown(self, stage: str) -> None:
        self._log_skips()

    def state_dict(self) -> dict[str, int]:
        """Where training stands on this rank (as on every rank): the epoch, and its batches trained on."""
        epoch, done = self._position["epoch"], self._position["batches"]
        if self._train_loader is not None and done >= len(self._train_loader):
            return {"epoch": epoch + 1, "batches": 0}
        return {"epoch": epoch, "batches": done}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._position = {"epoch": int(state_dict["epoch"]), "batches": int(state_dict["batches"])}
