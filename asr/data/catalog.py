"""What a source's splits hold: their manifests, cached, and the utterances of each usable for training and for
evaluation."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from asr.data.checks import Checks
from asr.data.librispeech import DataError, Problem, Utterance, apply_policy
from asr.data.manifest import Manifest, load_manifest
from asr.data.skips import SkipLog
from asr.data.sources import Source
from asr.data.verify import Verifier


def first_of_each_id(utterances: list[Utterance]) -> tuple[list[Utterance], list[Problem]]:
    """The rule for an id found twice in a split (two chapters, two parts): the first one (in manifest order: a
    folder's by chapter, an archive's in stream order) is kept, and each other one is a problem that names it."""
    first: dict[str, Utterance] = {}
    kept, repeated = [], []
    for utt in utterances:
        if utt.id in first:
            detail = f"{utt.id} is also {first[utt.id].where}, which is kept"
            repeated.append(Problem("duplicate utterance id", utt.where, detail))
        else:
            first[utt.id] = utt
            kept.append(utt)
    return kept, repeated


class Catalog:
    """The manifests of ``source``'s splits, cached in ``manifest_dir``, and the utterances of each that pass the
    ``checks``; the others are raised (``on_error="raise"``) or counted in ``skips``. With a ``verifier``, every
    file is decoded once first. Also the gzip indexes of the archives whose manifests have one, to read them by
    region."""

    def __init__(
        self,
        source: Source,
        checks: Checks,
        on_error: str,
        manifest_dir: Path,
        skips: SkipLog,
        verifier: Verifier | None = None,
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"data.on_error must be 'raise' or 'skip', not {on_error!r}")
        self.source, self.checks, self.on_error = source, checks, on_error
        self.manifest_dir, self.skips, self.verifier = manifest_dir, skips, verifier
        self.index_files: dict[str, str] = {}  # archives read by region -> their gzip index
        self._usable: dict[tuple[str, bool], list[Utterance]] = {}  # (split, for training) -> usable utterances

    def manifest(self, split: str, verify: bool = False) -> list[Manifest]:
        """The manifests of a split's parts, scanned once (again when ``verify`` finds a part changed), and with
        a ``verifier``, every file decoded once: when ``verify`` (in ``prepare_data``, once per node), not at each
        later read of the cached manifests."""
        manifests = [
            load_manifest(self.source, self.source.location(part), self.manifest_dir / f"{part}.json", verify)
            for part in self.source.parts(split)
        ]
        if verify and self.verifier is not None:
            for manifest in manifests:
                self.verifier.verify(manifest)
        return manifests

    def read(
        self, split: str, for_training: bool, manifests: list[Manifest] | None = None
    ) -> tuple[list[Utterance], list[Problem]]:
        """The usable utterances of a split, from its manifests, and the problems of the others; under
        ``on_error="raise"`` the first problem raises a :class:`DataError` instead."""
        utterances, problems = [], []
        for manifest in manifests or self.manifest(split):
            problems += apply_policy(manifest.problems, self.on_error)
            utterances += manifest.utterances
        utterances, repeated = first_of_each_id(utterances)
        problems += apply_policy(repeated, self.on_error)
        usable, unusable = self._check(utterances, for_training)
        return usable, problems + unusable

    def _check(self, utterances: list[Utterance], for_training: bool) -> tuple[list[Utterance], list[Problem]]:
        found = [(utt, self.checks.problem(utt, for_training)) for utt in utterances]
        problems = apply_policy([problem for _, problem in found if problem is not None], self.on_error)
        return [utt for utt, problem in found if problem is None], problems

    def load(self, split: str, for_training: bool) -> list[Utterance]:
        """The usable utterances of ``split``, read once and kept; their problems counted then. Training's are
        checked among evaluation's when those were loaded: nothing is counted twice."""
        if (split, for_training) not in self._usable:
            if for_training and (split, False) in self._usable:
                usable, problems = self._check(self._usable[split, False], True)
            else:
                manifests = self.manifest(split)
                self.index_files.update({m.source: m.index_file for m in manifests if m.index_file is not None})
                usable, problems = self.read(split, for_training, manifests)
            role = "training" if for_training else "evaluation"
            if not usable:
                skipped = dict(Counter(p.reason for p in problems))
                raise DataError(
                    f"{split}: no utterances usable for {role} in {self.source.locations(split)}, {skipped}"
                )
            self.skips.add(split, problems, len(usable), role)
            self._usable[split, for_training] = usable
        return self._usable[split, for_training]

    def loaded(self, split: str, for_training: bool) -> bool:
        return (split, for_training) in self._usable
