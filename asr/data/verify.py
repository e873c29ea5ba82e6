"""Decoding every utterance of a part up front (``data.verify=true``): audio whose header reads but whose frames do
not (truncated, corrupt) is found before training instead of in the epoch that meets it. The manifest records what
decoded whole, with the stamp of its file then, so an unchanged file is decoded once."""

from __future__ import annotations

import io
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from multiprocessing import get_context
from typing import BinaryIO

from asr.data.archive import read_members
from asr.data.checks import Checks
from asr.data.librispeech import DataError, Problem, Utterance, progress_bar
from asr.data.manifest import Manifest, write_manifest
from asr.data.sources import Source

log = logging.getLogger(__name__)


def stamp(utt: Utterance, manifest: Manifest) -> str:
    """What the verified bytes of ``utt`` are known by: its local file's size and time (an archive member: the
    archive's), else its part's fingerprint."""
    try:
        stat = os.stat(utt.path)
    except OSError:  # a URL, a Hugging Face row
        return manifest.fingerprint
    return f"{stat.st_size}/{stat.st_mtime_ns}"


def _records(
    source: Source, index_file: str | None, utterances: Sequence[Utterance]
) -> Iterator[tuple[Utterance, str | BinaryIO]]:
    if source.random_access:
        return ((utt, source.open(utt)) for utt in utterances)
    return ((utt, io.BytesIO(data)) for utt, data in read_members(utterances[0].path, index_file, utterances))


def _decode(
    checks: Checks, source: Source, index_file: str | None, utterances: Sequence[Utterance]
) -> list[Problem | None]:
    """Why each of ``utterances`` (of one part) does not decode whole, or None: a task of a verifying process."""
    found: list[Problem | None] = []
    for utt, audio in _records(source, index_file, utterances):
        try:
            checks.decode(utt, audio)
            found.append(None)
        except DataError as err:
            found.append(err.problem or Problem(err.reason, utt.where, str(err)))
    return found


@dataclass(frozen=True)
class Verifier:
    """Decodes the utterances of a manifest not verified since their files last changed, in ``workers`` processes
    when there are ``parallel_from`` or more, with a progress bar; those that fail become the manifest's problems
    (reasons as when training decodes them), the others are recorded as verified."""

    checks: Checks
    source: Source
    workers: int = 1
    parallel_from: int = 256

    def verify(self, manifest: Manifest) -> None:
        if not self.source.random_access and manifest.index_file is None:
            log.warning(
                "%s: not verified (data.verify): an archive without a gzip index can only be read whole; its audio "
                "is checked when streamed",
                manifest.source,
            )
            return
        stamps = {utt.where: stamp(utt, manifest) for utt in manifest.utterances}
        todo = [utt for utt in manifest.utterances if manifest.verified.get(utt.where) != stamps[utt.where]]
        if not todo:
            return
        start = time.perf_counter()
        found = dict(zip((utt.where for utt in todo), self._decode_all(manifest, todo), strict=True))
        problems = [problem for problem in found.values() if problem is not None]
        manifest.utterances = [utt for utt in manifest.utterances if found.get(utt.where) is None]
        manifest.problems = [*manifest.problems, *problems]
        manifest.verified.update((where, stamps[where]) for where, problem in found.items() if problem is None)
        write_manifest(manifest)
        log.info(
            "Verified %s: decoded %d files in %.1f s (%d verified before), problems: %s (manifest %s)",
            manifest.source,
            len(todo),
            time.perf_counter() - start,
            len(stamps) - len(todo),
            dict(Counter(p.reason for p in problems)) or "none",
            manifest.file,
        )

    def _decode_all(self, manifest: Manifest, todo: list[Utterance]) -> list[Problem | None]:
        """Contiguous chunks of ``todo`` (an archive's: regions, each inflated once), decoded in order."""
        workers = self.workers if len(todo) >= self.parallel_from else 1
        size = min(256, math.ceil(len(todo) / (4 * workers)))
        chunks = [todo[i : i + size] for i in range(0, len(todo), size)]
        workers = min(workers, len(chunks))
        found: list[Problem | None] = []
        with progress_bar() as progress, ExitStack() as stack:
            task = progress.add_task(f"Verifying {manifest.source.rpartition('/')[2]}", total=len(todo))
            if workers > 1:
                pool = stack.enter_context(ProcessPoolExecutor(workers, mp_context=get_context("spawn")))
                n = len(chunks)
                results = pool.map(_decode, [self.checks] * n, [self.source] * n, [manifest.index_file] * n, chunks)
            else:
                results = (_decode(self.checks, self.source, manifest.index_file, chunk) for chunk in chunks)
            for chunk in results:
                found += chunk
                progress.advance(task, len(chunk))
        return found
