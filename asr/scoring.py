"""Word error counts: the alignment of a reference with a hypothesis, its substitutions, deletions and insertions,
and which words are confused, over a split of predictions.

The alignment is a minimum-edit-distance one (so (S + D + I) / N is the WER torchmetrics computes), chosen among
the equally short ones as jiwer (rapidfuzz) chooses: the common prefix and suffix are hits, and the backtrace from
the end prefers a deletion, then a hit or substitution, then an insertion. S, D and I are therefore jiwer's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# Aligned words (reference, hypothesis): a hit or a substitution, or None on the side that lacks the word (a
# deletion has no hypothesis word, an insertion no reference word).
Pair = tuple[str | None, str | None]


def align(reference: str, hypothesis: str) -> list[Pair]:
    """The words of ``reference`` and ``hypothesis`` (split on whitespace) aligned, in order."""
    ref, hyp = reference.split(), hypothesis.split()
    shorter = min(len(ref), len(hyp))
    start = 0
    while start < shorter and ref[start] == hyp[start]:
        start += 1
    end = 0
    while end < shorter - start and ref[-1 - end] == hyp[-1 - end]:
        end += 1
    middle_ref, middle_hyp = ref[start : len(ref) - end], hyp[start : len(hyp) - end]
    middle = _backtrace(middle_ref, middle_hyp, _distances(middle_ref, middle_hyp))
    return [(w, w) for w in ref[:start]] + middle + [(w, w) for w in ref[len(ref) - end :]]


def _distances(ref: Sequence[str], hyp: Sequence[str]) -> list[list[int]]:
    """Levenshtein distances: ``d[i][j]`` between the first ``i`` words of ``ref`` and the first ``j`` of ``hyp``."""
    d = [list(range(len(hyp) + 1))]
    for i, word in enumerate(ref, 1):
        above, row = d[-1], [i]
        for j, other in enumerate(hyp, 1):
            row.append(min(above[j] + 1, row[j - 1] + 1, above[j - 1] + (word != other)))
        d.append(row)
    return d


def _backtrace(ref: Sequence[str], hyp: Sequence[str], d: list[list[int]]) -> list[Pair]:
    i, j = len(ref), len(hyp)
    pairs: list[Pair] = []
    while i or j:
        if i and d[i][j] == d[i - 1][j] + 1:
            i -= 1
            pairs.append((ref[i], None))
        elif not i or d[i][j - 1] < d[i - 1][j - 1]:
            j -= 1
            pairs.append((None, hyp[j]))
        else:
            i, j = i - 1, j - 1
            pairs.append((ref[i], hyp[j]))
    pairs.reverse()
    return pairs


@dataclass(frozen=True)
class Counts:
    """Reference words and the errors of one or more aligned pairs."""

    words: int = 0
    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0

    @classmethod
    def of(cls, pairs: Iterable[Pair]) -> Counts:
        words = substitutions = deletions = insertions = 0
        for ref, hyp in pairs:
            words += ref is not None
            substitutions += ref is not None and hyp is not None and ref != hyp
            deletions += hyp is None
            insertions += ref is None
        return cls(words, substitutions, deletions, insertions)

    def __add__(self, other: Counts) -> Counts:
        return Counts(
            self.words + other.words,
            self.substitutions + other.substitutions,
            self.deletions + other.deletions,
            self.insertions + other.insertions,
        )

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def hits(self) -> int:
        return self.words - self.substitutions - self.deletions

    @property
    def wer(self) -> float:
        """(S + D + I) / N; without reference words, the number of insertions (as jiwer)."""
        return self.errors / self.words if self.words else float(self.insertions)


class Confusions:
    """How often each reference word became each other hypothesis word, was deleted, or each word was inserted."""

    def __init__(self) -> None:
        self.substitutions: Counter[tuple[str, str]] = Counter()
        self.deletions: Counter[str] = Counter()
        self.insertions: Counter[str] = Counter()

    def add(self, pairs: Iterable[Pair]) -> None:
        for ref, hyp in pairs:
            if ref is None:
                self.insertions[hyp] += 1
            elif hyp is None:
                self.deletions[ref] += 1
            elif ref != hyp:
                self.substitutions[ref, hyp] += 1

    def top(self, n: int) -> dict[str, list[dict]]:
        """The ``n`` most frequent of each kind, most frequent first (ties in alphabetical order)."""

        def most(counter: Counter) -> list:
            return sorted(counter.items(), key=lambda item: (-item[1], item[0]))[:n]

        return {
            "substitutions": [
                {"reference": ref, "hypothesis": hyp, "count": c} for (ref, hyp), c in most(self.substitutions)
            ],
            "deletions": [{"word": word, "count": c} for word, c in most(self.deletions)],
            "insertions": [{"word": word, "count": c} for word, c in most(self.insertions)],
        }


def score_predictions(predictions: list[dict], splits: Sequence[str], top: int) -> dict:
    """Adds the word counts of each prediction (``split``, ``reference``, ``hypothesis``) to it: ``words``,
    ``substitutions``, ``deletions``, ``insertions``. Returns, per split in ``splits`` and over all (``"all"``),
    the summed :class:`Counts` (``counts``) and the ``top`` most frequent confusions (``confusions``)."""
    counts = {split: Counts() for split in (*splits, "all")}
    confusions = {split: Confusions() for split in (*splits, "all")}
    for row in predictions:
        pairs = align(row["reference"], row["hypothesis"])
        utterance = Counts.of(pairs)
        row.update(
            words=utterance.words,
            substitutions=utterance.substitutions,
            deletions=utterance.deletions,
            insertions=utterance.insertions,
        )
        for split in (row["split"], "all"):
            counts[split] += utterance
            confusions[split].add(pairs)
    return {split: {"counts": counts[split], "confusions": confusions[split].top(top)} for split in counts}
