"""Manifests: per LibriSpeech part, every utterance (id, file or archive member, length, transcript, speaker)
and every problem found, written by a one-time scan and reused while the source stays unchanged."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from asr.data import hf
from asr.data.archive import is_archive, read_archive, replaced_atomically, serves_ranges
from asr.data.librispeech import Problem, Utterance, progress_bar, scan_directory
from asr.data.remote import is_url

log = logging.getLogger(__name__)

# 2: archive members' offsets and sizes, and the gzip index of a local archive; 3: of an archive over HTTP too
VERSION = 3
UNKNOWN = "unknown"  # the fingerprint of a URL whose server does not answer HEAD


@dataclass
class Manifest:
    source: str  # a split folder, or an archive file or URL
    fingerprint: str
    utterances: list[Utterance]  # a folder's sorted by id; an archive's in stream order
    problems: list[Problem]
    index_file: str | None = None  # an archive's gzip index, to read it in parts (asr.data.archive.read_members)


def fingerprint(location: str) -> str:
    """A cheap identity of a source: a folder's file names, sizes and times; an archive's size and time; a
    Hugging Face split's cache files'."""
    if hf.is_hf(location):
        return hf.fingerprint(location)
    if is_url(location):
        try:
            request = urllib.request.Request(location, method="HEAD")
            with urllib.request.urlopen(request, timeout=30) as response:
                headers = response.headers
                return f"{headers.get('Content-Length')}/{headers.get('Last-Modified')}/{headers.get('ETag')}"
        except urllib.error.URLError as err:
            log.warning("Cannot check whether %s changed (%s)", location, err)
            return UNKNOWN
    path = Path(location).expanduser()
    if path.is_file():
        stat = path.stat()
        return f"{stat.st_size}/{stat.st_mtime_ns}"
    if not path.is_dir():
        raise FileNotFoundError(f"{location} does not exist")
    digest = hashlib.sha1()
    for folder, subfolders, files in os.walk(path):
        subfolders.sort()
        for name in sorted(files):
            stat = os.stat(os.path.join(folder, name))
            digest.update(f"{folder}/{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def scan(location: str, workers: int = 1, index_to: Path | None = None) -> Manifest:
    """Read every transcript and audio header of a folder (in parallel), an archive (in one pass) or a Hugging
    Face split. The gzip index of an archive that can be read in parts (a local file, or a URL whose server serves
    byte ranges) is written to ``index_to`` on the way."""
    if hf.is_hf(location):
        return Manifest(location, "", *hf.scan(location))
    if not is_archive(location):
        return Manifest(location, "", *scan_directory(location, workers))
    if is_url(location) and not serves_ranges(location):
        log.warning("%s: the server does not serve byte ranges, so every stream shard will read the whole "
                    "archive; download it first (python -m asr.data download) to read it in parts", location)
        index_to = None
    utterances, problems = [], []
    with progress_bar() as progress:
        for record in read_archive(location, progress=progress, index_to=index_to):
            if isinstance(record, Problem):
                problems.append(record)
            else:
                utterances.append(record[0])
    return Manifest(location, "", utterances, problems, None if index_to is None else str(index_to))


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
    return Manifest(data["source"], data["fingerprint"], [Utterance(**u) for u in data["utterances"]],
                    [Problem(*p) for p in data["problems"]], None if index_file is None else str(index_file))


def _write(manifest: Manifest, path: Path) -> None:
    data = {"version": VERSION, "source": manifest.source, "fingerprint": manifest.fingerprint,
            "indexed": manifest.index_file is not None, "problems": [list(p) for p in manifest.problems],
            "utterances": [asdict(u) for u in manifest.utterances]}
    with replaced_atomically(path) as partial:
        partial.write_text(json.dumps(data))


def load_manifest(location: str, path: str | Path, workers: int = 1, verify: bool = True) -> Manifest:
    """The manifest of ``location`` cached at ``path``; scanned and written when missing, or when ``verify``
    finds that the source changed since. An archive's gzip index goes next to it (``.gzidx``)."""
    path = Path(path).expanduser()
    cached = _read(path)
    if cached is not None and cached.source == location and not verify:
        return cached
    current = fingerprint(location)
    if cached is not None and cached.source == location and current in (cached.fingerprint, UNKNOWN):
        return cached
    start = time.perf_counter()
    manifest = scan(location, workers, index_file_of(path))
    manifest.fingerprint = current
    _write(manifest, path)
    hours = sum(u.duration for u in manifest.utterances) / 3600
    log.info("Scanned %s in %.1f s: %d utterances, %.2f h, problems: %s (manifest %s)", location,
             time.perf_counter() - start, len(manifest.utterances), hours,
             dict(Counter(p.reason for p in manifest.problems)) or "none", path)
    return manifest
