"""The LightningDataModule: LibriSpeech (or the synthetic demo corpus) in, duration-bucketed batches out."""

from __future__ import annotations

import logging
from collections import Counter

import lightning as L
from torch.utils.data import DataLoader

from asr.data.batching import DurationBatchSampler
from asr.data.dataset import SpeechDataset, collate
from asr.data.demo import DemoCorpusConfig, build_demo_corpus
from asr.data.librispeech import DataError, Utterance, read_split
from asr.data.text import CharTokenizer

log = logging.getLogger(__name__)


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
        seed: int = 0,
        on_error: str = "skip",
        demo_corpus: dict | None = None,
    ) -> None:
        super().__init__()
        if on_error not in ("raise", "skip"):
            raise ValueError(f"data.on_error must be 'raise' or 'skip', not {on_error!r}")
        self.root = root
        self.train_splits, self.val_splits, self.test_splits = train_splits, val_splits, test_splits
        self.tokenizer = tokenizer
        self.batch_size, self.max_batch_seconds = batch_size, max_batch_seconds
        self.eval_batch_size, self.eval_max_batch_seconds = eval_batch_size, eval_max_batch_seconds
        self.min_duration, self.max_duration = min_duration, max_duration
        self.num_workers = num_workers
        self.seed = seed
        self.on_error = on_error
        self.demo_corpus = DemoCorpusConfig(**demo_corpus) if demo_corpus is not None else None
        self.skipped: Counter = Counter()
        self._utterances: dict[str, list[Utterance]] = {}

    def prepare_data(self) -> None:
        if self.demo_corpus is not None:
            build_demo_corpus(self.root, self.demo_corpus)

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": self.train_splits + self.val_splits, "validate": self.val_splits, "test": self.test_splits}
        for split in wanted.get(stage, self.train_splits + self.val_splits + self.test_splits):
            if split not in self._utterances:
                self._utterances[split] = self.load_split(split, for_training=split in self.train_splits)

    def load_split(self, split: str, for_training: bool) -> list[Utterance]:
        """The usable utterances of a split; each skipped one is counted by reason in ``self.skipped``."""
        utterances, skipped = read_split(self.root, split, self.on_error)
        kept = []
        for utt in utterances:
            problem = self._problem(utt, for_training)
            if problem is None:
                kept.append(utt)
            elif self.on_error == "raise":
                raise DataError(f"{utt.path}: {problem[0]} ({problem[1]})")
            else:
                skipped[problem[0]] += 1
        if skipped:
            log.warning("%s: kept %d utterances, skipped %s", split, len(kept), dict(skipped))
        self.skipped.update({f"{split}/{reason}": n for reason, n in skipped.items()})
        return kept

    def _problem(self, utt: Utterance, for_training: bool) -> tuple[str, str] | None:
        """Why an utterance cannot be used, as (reason, detail), or None."""
        # Checked before normalisation, which would strip such characters from the label silently.
        unknown = self.tokenizer.unknown_characters(utt.transcript.upper().replace("-", " "))
        if unknown:
            return "characters outside the vocabulary", "".join(sorted(unknown))
        if for_training and self.min_duration is not None and utt.duration < self.min_duration:
            return "shorter than data.min_duration", f"{utt.duration:.2f} s"
        if for_training and self.max_duration is not None and utt.duration > self.max_duration:
            return "longer than data.max_duration", f"{utt.duration:.2f} s"
        return None

    def _loader(self, utterances: list[Utterance], sampler: DurationBatchSampler) -> DataLoader:
        return DataLoader(
            SpeechDataset(utterances, self.tokenizer),
            batch_sampler=sampler,
            collate_fn=collate,
            num_workers=self.num_workers,
            pin_memory=True,
            persistent_workers=self.num_workers > 0,
        )

    def _rank_and_world(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)

    def train_dataloader(self) -> DataLoader:
        utterances = [u for split in self.train_splits for u in self._utterances[split]]
        rank, world = self._rank_and_world()
        sampler = DurationBatchSampler(
            [u.duration for u in utterances], self.batch_size, self.max_batch_seconds,
            shuffle=True, seed=self.seed, rank=rank, world_size=world, drop_uneven=True,
        )
        return self._loader(utterances, sampler)

    def _eval_loaders(self, splits: list[str]) -> list[DataLoader]:
        rank, world = self._rank_and_world()
        batch_size = self.eval_batch_size if self.eval_max_batch_seconds is None else None
        loaders = []
        for split in splits:
            utterances = self._utterances[split]
            sampler = DurationBatchSampler(
                [u.duration for u in utterances], batch_size, self.eval_max_batch_seconds,
                shuffle=False, rank=rank, world_size=world, drop_uneven=False,
            )
            loaders.append(self._loader(utterances, sampler))
        return loaders

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self.val_splits)

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self.test_splits)
