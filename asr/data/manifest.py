"""Manifests: per part, every utterance (id, file, archive member or row, length, transcript, speaker) and every
problem found, written by a source's one-time scan and reused while its fingerprint stays unchanged."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from asr.data.archive import replaced_atomically
from asr.data.librispeech import Problem, Utterance

if TYPE_CHECKING:
    from asr.data.sources import Source

log = logging.getLogger(__name__)

# 2: archive members' offsets and sizes, and the gzip index of a local archive; 3: of an archive over HTTP too
VERSION = 3
UNKNOWN = "unknown"  # the fingerprint of a location that cannot be checked now: its manifest is trusted


@dataclass
class Manifest:
    source: str  # the part's location (asr.data.sources.Source.location)
    fingerprint: str
    utterances: list[Utterance]  # a folder's sorted by id; an archive's in stream order
    problems: list[Problem]
    index_file: str | None = None  # an archive's gzip index, to read it in parts (asr.data.archive.read_members)


def index_file_of(path: Path) -> Path:
    """Where the gzip index of an archive's manifest ``path`` is."""
    return path.with_suffix(".gzidx")


def _read(path: Path) -> Manifest | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    index_file = index_file_of(path) if data.get("indexed") else None
    if data.get("version") != VERSION or (index_file is not None and not index_file.is_file()):
        return None
    return Manifest(
        data["source"],
        data["fingerprint"],
        [Utterance(**u) for u in data["utterances"]],
        [Problem(*p) for p in data["problems"]],
        None if index_file is None else str(index_file),
    )


def _write(manifest: Manifest, path: Path) -> None:
    data = {
        "version": VERSION,
        "source": manifest.source,
        "fingerprint": manifest.fingerprint,
        "indexed": manifest.index_file is not None,
        "problems": [list(p) for p in manifest.problems],
        "utterances": [asdict(u) for u in manifest.utterances],
    }
    with replaced_atomically(path) as partial:
        partial.write_text(json.dumps(data))


def load_manifest(source: Source, location: str, path: str | Path, verify: bool = True) -> Manifest:
    """The manifest of ``source``'s ``location`` cached at ``path``; scanned and written when missing, or when
    ``verify`` finds that the location changed since. An archive's gzip index goes next to it (``.gzidx``)."""
    path = Path(path).expanduser()
    cached = _read(path)
    if cached is not None and cached.source == location and not verify:
        return cached
    current = source.fingerprint(location)
    if cached is not None and cached.source == location and current in (cached.fingerprint, UNKNOWN):
        return cached
    start = time.perf_counter()
    manifest = source.scan(location, index_file_of(path))
    manifest.fingerprint = current
    _write(manifest, path)
    hours = sum(u.duration for u in manifest.utterances) / 3600
    log.info(
        "Scanned %s in %.1f s: %d utterances, %.2f h, problems: %s (manifest %s)",
        location,
        time.perf_counter() - start,
        len(manifest.utterances),
        hours,
        dict(Counter(p.reason for p in manifest.problems)) or "none",
        path,
    )
    return manifest
