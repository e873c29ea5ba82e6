"""Unusable utterances: counted and named, found in manifests at setup or when decoding in any epoch or pass; and
their list, written as a file a user can act on."""

from __future__ import annotations

import csv
import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from asr.data.archive import replaced_atomically
from asr.data.librispeech import Problem

log = logging.getLogger(__name__)

EXAMPLES = 3  # problems named per reason in logs and on screen
COLUMNS = ("split", "reason", "id", "where", "detail")


def describe(problems: Sequence[Problem], examples: int = EXAMPLES, indent: str = "  ") -> str:
    """Lines naming ``problems``: a line per reason with its count, then its first ``examples`` further in."""
    by_reason: dict[str, list[Problem]] = defaultdict(list)
    for problem in problems:
        by_reason[problem.reason].append(problem)
    lines = []
    for reason, found in by_reason.items():
        lines.append(f"{indent}{reason}: {len(found)}")
        lines += [f"{indent}  {p.where}" + (f" ({p.detail})" if p.detail else "") for p in found[:examples]]
        if len(found) > examples:
            lines.append(f"{indent}  ... and {len(found) - examples} more")
    return "\n".join(lines)


def write_list(rows: Iterable[tuple[str, Problem]], path: Path) -> None:
    """A tab-separated list of ``(split, problem)`` rows, with a header line: split, reason, id, where, detail."""
    with replaced_atomically(path) as partial, open(partial, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows((split, p.reason, p.id, p.where, " ".join(p.detail.split())) for split, p in rows)


class SkipLog:
    """Unusable utterances by ``"<split>/<reason>"``, each counted once however many epochs and evaluation passes
    meet it; a decoding skip is put under the split whose ``locations`` hold it, so that a training skip and an
    evaluation one of the same utterance have the same key. Setup skips are logged as they are added, the decoding
    skips of each stage and epoch when it ends, the first few of each reason named; with a ``list_file``, every
    one is listed there (:func:`write_list`), and the logs say where."""

    def __init__(self, locations: Callable[[str], Sequence[str]], list_file: Path | None = None) -> None:
        self.locations = locations
        self.list_file = list_file
        self._problems: dict[str, dict[str, Problem]] = defaultdict(dict)  # key -> where -> its problem
        self._stage: tuple[str, int] | None = None  # the (stage, epoch) being decoded
        self._decoded: list[Problem] = []  # its skips

    @property
    def counts(self) -> Counter:
        return Counter({key: len(found) for key, found in self._problems.items()})

    def rows(self) -> list[tuple[str, Problem]]:
        """Every unusable utterance, as (split, problem)."""
        return [(key.rpartition("/")[0], p) for key, found in self._problems.items() for p in found.values()]

    def add(self, split: str, problems: Sequence[Problem], usable: int, role: str) -> None:
        """Problems found at setup in ``split``, which leaves ``usable`` utterances for ``role``."""
        for problem in problems:
            self._problems[f"{split}/{problem.reason}"].setdefault(problem.where, problem)
        if problems:
            self._write()
            log.warning(
                "%s: %d utterances for %s; skipped %d%s:\n%s",
                split,
                usable,
                role,
                len(problems),
                self._listed(),
                describe(problems),
            )

    def decoded(self, stage: str, epoch: int, splits: Sequence[str], skipped: Sequence[Problem]) -> None:
        """A batch's decoding skips, of utterances of ``splits``, in ``stage`` and ``epoch``; the skips of the
        stage and epoch before are logged first."""
        if (stage, epoch) != self._stage:
            self.flush()
            self._stage = (stage, epoch)
        for problem in skipped:
            self._problems[f"{self._split_of(problem.where, splits)}/{problem.reason}"].setdefault(
                problem.where, problem
            )
            self._decoded.append(problem)

    def _split_of(self, where: str, splits: Sequence[str]) -> str:
        """Which of ``splits`` holds the utterance at ``where``: a file under a part's folder, or an archive
        member or row (``<location>:...``)."""
        for split in splits:
            if any(where.startswith((f"{location}/", f"{location}:")) for location in self.locations(split)):
                return split
        return "+".join(splits)

    def _listed(self) -> str:
        return "" if self.list_file is None else f" (all {sum(self.counts.values())} listed in {self.list_file})"

    def _write(self) -> None:
        if self.list_file is not None:
            write_list(self.rows(), self.list_file)

    def flush(self) -> None:
        """Log the decoding skips of the stage and epoch under way."""
        if not self._decoded:
            return
        stage, epoch = self._stage
        self._write()
        log.warning(
            "%s, epoch %d: skipped %d utterances while decoding%s:\n%s",
            stage,
            epoch,
            len(self._decoded),
            self._listed(),
            describe(self._decoded),
        )
        self._decoded.clear()
