"""The LightningDataModule: splits from a source in; duration-bucketed batches out, as many on every rank,
resumable mid-epoch."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from asr.data.augment import Augmentation
from asr.data.batching import Budget, DistributedBatchSampler, DurationBatchSampler
from asr.data.catalog import Catalog
from asr.data.checks import Checks
from asr.data.dataset import SpeechDataset, model_inputs
from asr.data.loaders import SpeechLoader, TrainingPosition, WorkerTransport, slot_samples
from asr.data.skips import SkipLog
from asr.data.sources import Source
from asr.data.stream import StreamDataset, stream_batches, stream_regions, stream_shards
from asr.data.text import CharTokenizer
from asr.data.verify import Verifier

log = logging.getLogger(__name__)


class SpeechDataModule(L.LightningDataModule):
    """Composes a :class:`Source`, the :class:`Checks` of what the model can use (its ``sample_rate``, receptive
    field ``min_samples`` and ``frames_per_second``), a :class:`Catalog` of the usable utterances (manifests cached in
    ``manifest_dir``, default ``<root>/manifests``; with ``verify``, every file decoded once up front), batch
    samplers over them (or streams, for a source without random access), a :class:`SkipLog` (its list in
    ``skip_list``, by default the run folder's ``skipped.tsv``), a :class:`WorkerTransport` and this rank's
    :class:`TrainingPosition`."""

    def __init__(
        self,
        source: Source,
        tokenizer: CharTokenizer,
        root: str,
        train_splits: list[str],
        val_splits: list[str],
        test_splits: list[str],
        *,
        # The model's facts (asr.builders.build_datamodule)
        sample_rate: int,
        min_samples: int,
        frames_per_second: float,
        # Batches
        batch_size: int | None = None,
        max_batch_seconds: float | None = None,
        eval_batch_size: int | None = None,
        eval_max_batch_seconds: float | None = None,
        shuffle_buffer: int = 1000,
        batches_per_epoch: int | None = None,
        seed: int = 0,
        # What is usable, and what is done with the rest
        min_duration: float | None = None,
        max_duration: float | None = None,
        resample: bool = False,
        on_error: str = "skip",
        verify: bool = False,
        skip_list: str | None = None,
        # The worker transport
        num_workers: int = 4,
        pin_memory: bool | None = None,
        prefetch_factor: int | None = None,
        task_seconds: float | None = 60.0,
        manifest_dir: str | None = None,
        # Waveform augmentation of the training batches (asr.builders.build_augmentation)
        augment: Augmentation | None = None,
    ) -> None:
        super().__init__()
        self.source, self.root = source, root
        self.train_splits, self.val_splits, self.test_splits = train_splits, val_splits, test_splits
        self.augment = augment
        slowest, fastest = augment.speeds if augment is not None else (1.0, 1.0)
        if max_batch_seconds is not None and slowest < 1:
            # Batches slowed down by up to 1/slowest still hold at most max_batch_seconds (docs/augmentation.md).
            log.info(
                "augment.speed: training batches of up to %.2f s of audio (data.max_batch_seconds=%s x the slowest "
                "factor %s), at most %s s once slowed down; longer utterances are left out",
                max_batch_seconds * slowest,
                max_batch_seconds,
                slowest,
                max_batch_seconds,
            )
            max_batch_seconds *= slowest
        self.checks = Checks(
            tokenizer,
            sample_rate=sample_rate,
            resample=resample,
            min_samples=min_samples,
            frames_per_second=frames_per_second,
            min_duration=min_duration,
            max_duration=max_duration,
            max_batch_seconds=max_batch_seconds,
            max_speed=max(1.0, fastest),
        )
        self.budget = Budget(batch_size, max_batch_seconds)
        self.eval_budget = Budget(eval_batch_size if eval_max_batch_seconds is None else None, eval_max_batch_seconds)
        self.shuffle_buffer, self.batches_per_epoch, self.seed = shuffle_buffer, batches_per_epoch, seed
        self.transport = WorkerTransport(num_workers, pin_memory, prefetch_factor, task_seconds)
        self.skips = SkipLog(source.locations, None if skip_list is None else Path(skip_list).expanduser())
        manifest_dir = Path(manifest_dir or Path(root) / "manifests").expanduser()
        verifier = Verifier(self.checks, source, max(1, num_workers)) if verify else None
        self.catalog = Catalog(source, self.checks, on_error, manifest_dir, self.skips, verifier)
        self.position = TrainingPosition()
        self._train_loader: DataLoader | None = None

    @property
    def skipped(self) -> Counter:
        """Unusable utterances by ``"<split>/<reason>"``, each counted once (:class:`SkipLog`)."""
        return self.skips.counts

    def _all_splits(self) -> list[str]:
        return list(dict.fromkeys([*self.train_splits, *self.val_splits, *self.test_splits]))

    def _scanned(self, split: str) -> bool:
        """Whether a split has a manifest: all do but streams trained on with ``batches_per_epoch`` set."""
        return self.batches_per_epoch is None or split not in self.train_splits or self.source.random_access

    def _list_skips(self) -> None:
        """In training, unusable utterances are listed in the run folder (``skipped.tsv``) unless
        ``skip_list`` names another file; by rank 0."""
        if self.skips.list_file is None and self.trainer is not None and self.trainer.is_global_zero:
            self.skips.list_file = Path(self.trainer.default_root_dir) / "skipped.tsv"

    def prepare_data(self) -> None:
        """Prepare the source, and scan the manifests that are missing or out of date (once per node); with
        ``verify``, decode the files not verified yet."""
        self.source.prepare()
        for split in self._all_splits():
            if self._scanned(split):
                self.catalog.manifest(split, verify=True)
            elif self.catalog.verifier is not None:
                log.warning(
                    "%s: not verified (data.verify): streamed without a manifest (data.batches_per_epoch)", split
                )

    def setup(self, stage: str | None = None) -> None:
        """Load each split's usable utterances: for evaluation every utterance the model can encode, and for
        training those it can use (duration limits, CTC length), so that a split both trained and evaluated on is
        evaluated whole. Streams without a manifest report their problems as they meet them."""
        self._list_skips()
        wanted = {"fit": self.train_splits + self.val_splits, "validate": self.val_splits, "test": self.test_splits}
        for split in filter(self._scanned, wanted.get(stage, self._all_splits())):
            if split in self.val_splits + self.test_splits and not self.catalog.loaded(split, False):
                budget = self.eval_budget.max_batch_seconds
                longer = [
                    u.duration for u in self.catalog.load(split, False) if budget is not None and u.duration > budget
                ]
                if longer:
                    log.warning(
                        "%s: %d utterances longer than data.eval_max_batch_seconds=%s are batched alone "
                        "(longest %.1f s)",
                        split,
                        len(longer),
                        budget,
                        max(longer),
                    )
            if split in self.train_splits:
                self.catalog.load(split, True)
        if self.augment is not None and stage in ("fit", None):
            self.augment.load()

    def _rank_and_world(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)

    def _next_pass(self) -> tuple[int, int]:
        return self.position.next_pass(self.trainer.current_epoch if self.trainer else 0)

    def train_dataloader(self) -> DataLoader:
        self._train_loader = self._loader(self.train_splits, training=True)
        return self._train_loader

    def val_dataloader(self) -> list[DataLoader]:
        return [self._loader([split], training=False) for split in self.val_splits]

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader([split], training=False) for split in self.test_splits]

    def _loader(self, splits: list[str], training: bool) -> SpeechLoader:
        """Batches of ``splits``: this rank's duration-bucketed ones (shuffled, and as many as every other rank's,
        in training), handed to the workers in tasks; or from a stream, this rank's shards'."""
        rank, world = self._rank_and_world()
        budget, on_error = self.budget if training else self.eval_budget, self.catalog.on_error
        position = self._next_pass if training else None
        scanned = all(self.catalog.loaded(split, training) for split in splits)
        utterances = [u for split in splits for u in self.catalog.load(split, training)] if scanned else []
        durations = [u.duration for u in utterances]
        longest = max(durations, default=0.0) if scanned else None
        if self.source.random_access:
            buckets = DurationBatchSampler(durations, *budget, shuffle=training, seed=self.seed)
            sampler = DistributedBatchSampler(buckets, rank, world, drop_uneven=training)
            samples = slot_samples(self.checks, budget, longest)
            group = self.transport.group(durations, budget, samples)
            slots = self.transport.slots(samples, group)
            dataset = SpeechDataset(self.source, utterances, self.checks, on_error, slots)
            return SpeechLoader(
                dataset,
                batch_sampler=sampler,
                group=group,
                position=position,
                persistent_workers=self.transport.num_workers > 0,
                **self.transport.options(),
            )
        workers, indexed = max(1, self.transport.num_workers), self.catalog.index_files
        shards = stream_shards(utterances, world * workers, indexed) if scanned else []
        batches = None
        if training:
            batches = self.batches_per_epoch or stream_batches(
                shards, indexed, budget, self.shuffle_buffer, self.seed, workers, splits
            )
            if longest is None:  # the longest utterance training keeps, by its limits
                longest = min(
                    (s for s in (self.checks.max_duration, budget.max_batch_seconds) if s is not None), default=None
                )
        dataset = StreamDataset(
            [loc for split in splits for loc in self.source.locations(split)],
            self.checks,
            on_error,
            *budget,
            self.shuffle_buffer,
            self.seed,
            rank,
            world,
            batches,
            stream_regions(shards, indexed, rank, workers),
            counted=scanned,
            slots=self.transport.slots(slot_samples(self.checks, budget, longest)),
        )
        return SpeechLoader(dataset, batch_size=None, position=position, **self.transport.options())

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Make the model's inputs on the device, training batches augmented first (seeded by the batch's place:
        seed, epoch, its position in the epoch on this rank, rank); count the training batches this rank received
        (its resume position), and decoding skips."""
        stage = getattr(self.trainer.state.stage, "value", None) if self.trainer else "train"
        epoch = self.trainer.current_epoch if self.trainer else self.position.epoch
        if stage == "train":
            self.position.received(epoch)
            if self.augment is not None:
                rank = self._rank_and_world()[0]
                batch = self.augment(batch, (self.seed, epoch, self.position.batches - 1, rank))
        batch = model_inputs(batch)
        skipped = batch.get("skipped") or []
        splits = []
        if skipped:
            splits = (
                self.train_splits
                if stage == "train"
                else [(self.test_splits if stage == "test" else self.val_splits)[dataloader_idx]]
            )
        self.skips.decoded(stage, epoch, splits, skipped)
        return batch

    def teardown(self, stage: str) -> None:
        self.skips.flush()

    def state_dict(self) -> dict[str, int]:
        return self.position.state_dict(None if self._train_loader is None else len(self._train_loader))

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.position.load_state_dict(state_dict)
