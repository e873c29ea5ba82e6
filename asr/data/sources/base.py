"""The interface of a data source, chosen with the config group ``data/source``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import BinaryIO

from asr.data.librispeech import Utterance, parts
from asr.data.manifest import Manifest


class Source(ABC):
    """Where a split's utterances come from. A split is one or more parts (``train-960`` is three), each read
    from one location: a source lists a part's utterances into a :class:`Manifest`, and opens an utterance's
    audio. The DataModule caches the manifests and reads them; nothing else about the source is known to it."""

    # False: the parts are read as streams (archives, by :class:`~asr.data.stream.StreamDataset`), not by
    # utterance through :meth:`open`.
    random_access: bool = True

    def prepare(self) -> None:  # noqa: B027 (a hook: most sources have nothing to prepare)
        """Once per node, before any manifest is read: make the data there if it is made locally."""

    def parts(self, split: str) -> tuple[str, ...]:
        return parts(split)

    @abstractmethod
    def location(self, part: str) -> str:
        """Where ``part`` is read from: a folder, a file, a URL..., also the prefix of its utterances'
        :attr:`~asr.data.librispeech.Utterance.where`."""

    def locations(self, split: str) -> list[str]:
        return [self.location(part) for part in self.parts(split)]

    @abstractmethod
    def fingerprint(self, location: str) -> str:
        """A cheap identity of what ``location`` holds: a cached manifest is scanned again when it changes."""

    @abstractmethod
    def scan(self, location: str, index_to: Path) -> Manifest:
        """Every utterance of ``location`` and every problem found (its fingerprint left to the caller).
        ``index_to`` is where a source that keeps an index next to the manifest may write it."""

    def open(self, utt: Utterance) -> str | BinaryIO:
        """What to decode ``utt`` from: a file name or a binary stream."""
        return utt.path

    def preopen(self, utterances: Iterable[Utterance]) -> None:  # noqa: B027 (a hook)
        """Open here what :meth:`open` needs for ``utterances``: DataLoader workers then get it with the source
        instead of opening it again each."""

    @abstractmethod
    def missing(self, splits: Sequence[str]) -> str | None:
        """Why a run on ``splits`` cannot start (its data is absent), with how to fix it; None when it can. Checked
        before anything is built, without network access."""

    def reading(self, manifest: Manifest) -> str:
        """How loaders read a part, for ``python -m asr.data inspect``."""
        return "at random"
