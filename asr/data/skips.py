"""Counting unusable utterances: found in manifests at setup, or when decoding in any epoch or pass."""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence

from asr.data.librispeech import Problem

log = logging.getLogger(__name__)


class SkipLog:
    """Unusable utterances by ``"<split>/<reason>"``, each counted once however many epochs and evaluation passes
    meet it; a decoding skip is put under the split whose ``locations`` hold it, so that a training skip and an
    evaluation one of the same utterance have the same key. The decoding skips of each stage and epoch are logged
    when it ends."""

    def __init__(self, locations: Callable[[str], Sequence[str]]) -> None:
        self.locations = locations
        self._where: dict[str, set[str]] = defaultdict(set)  # key -> where its utterances are
        self._stage: tuple[str, int] | None = None  # the (stage, epoch) being decoded
        self._decoded: Counter = Counter()  # its skips, by key
        self._examples: dict[str, str] = {}  # reason -> where, one of its skips

    @property
    def counts(self) -> Counter:
        return Counter({key: len(where) for key, where in self._where.items()})

    def add(self, split: str, problems: Iterable[Problem]) -> None:
        """Problems found at setup, in ``split``."""
        for problem in problems:
            self._where[f"{split}/{problem.reason}"].add(problem.where)

    def decoded(self, stage: str, epoch: int, splits: Sequence[str], skipped: Sequence[tuple[str, str]]) -> None:
        """A batch's decoding skips, (reason, where) of an utterance of one of ``splits``, in ``stage`` and
        ``epoch``; the skips of the stage and epoch before are logged first."""
        if (stage, epoch) != self._stage:
            self.flush()
            self._stage = (stage, epoch)
        for reason, where in skipped:
            key = f"{self._split_of(where, splits)}/{reason}"
            self._decoded[key] += 1
            self._where[key].add(where)
            self._examples.setdefault(reason, where)

    def _split_of(self, where: str, splits: Sequence[str]) -> str:
        """Which of ``splits`` holds the utterance at ``where``: a file under a part's folder, or an archive
        member or row (``<location>:...``)."""
        for split in splits:
            if any(where.startswith((f"{location}/", f"{location}:")) for location in self.locations(split)):
                return split
        return "+".join(splits)

    def flush(self) -> None:
        """Log the decoding skips of the stage and epoch under way."""
        if not self._decoded:
            return
        stage, epoch = self._stage
        examples = "; ".join(f"{reason}: {where}" for reason, where in self._examples.items())
        log.warning(
            "%s, epoch %d: skipped %d utterances while decoding: %s (e.g. %s)",
            stage,
            epoch,
            sum(self._decoded.values()),
            dict(self._decoded),
            examples,
        )
        self._decoded.clear()
        self._examples.clear()
