"""Manifests: per part, every utterance (id, file, archive member or row, length, transcript, speaker) and every
problem found, written by a source's one-time scan and reused while its fingerprint stays unchanged."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from asr.data.archive import replaced_atomically
from asr.data.librispeech import Problem, Utterance

if TYPE_CHECKING:
    from asr.data.sources import Source

log = logging.getLogger(__name__)

# 2: archive members' offsets and sizes, and the gzip index of a local archive; 3: of an archive over HTTP too;
# 4: the files verified by decoding (asr.data.verify)
VERSION = 4
UNKNOWN = "unknown"  # the fingerprint of a location that cannot be checked now: its manifest is trusted


@dataclass
class Manifest:
    source: str  # the part's location (asr.data.sources.Source.location)
    fingerprint: str
    utterances: list[Utterance]  # a folder's sorted by id; an archive's in stream order
    problems: list[Problem]
    index_file: str | None = None  # an archive's gzip index, to read it in parts (asr.data.archive.read_members)
    # The utterances decoded whole without error: where -> the stamp of its file then (asr.data.verify.stamp)
    verified: dict[str, str] = field(default_factory=dict)
    file: str | None = None  # where it was read from or written to (not saved)


def index_file_of(path: Path) -> Path:
    """Where the gzip index of an archive's manifest ``path`` is."""
    return path.with_suffix(".gzidx")


def own_place(path: Path) -> Path:
    """Where this user keeps the manifest ``path`` when they cannot read it or write in its folder (a shared corpus
    scanned by another user): ``$ASR_CACHE/manifests/<folder digest>/`` (default ``~/.cache/asr``)."""
    cache = Path(os.environ.get("ASR_CACHE", "~/.cache/asr")).expanduser()
    return cache / "manifests" / hashlib.sha1(str(path.parent.absolute()).encode()).hexdigest()[:16] / path.name


def _read(path: Path) -> Manifest | None:
    """The manifest at ``path``; None when there is none, or it is of another version, or not a manifest (with a
    warning: it is scanned again). PermissionError when it cannot be read."""
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
        if data.get("version") != VERSION:
            return None
        index_file = index_file_of(path) if data["indexed"] else None
        if index_file is not None and not index_file.is_file():
            return None
        return Manifest(
            data["source"],
            data["fingerprint"],
            [Utterance(**u) for u in data["utterances"]],
            [Problem(*p) for p in data["problems"]],
            None if index_file is None else str(index_file),
            dict(data["verified"]),
        )
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        log.warning("%s is not a manifest (%s: %s): its part is scanned again", path, type(err).__name__, err)
        return None


def _write(manifest: Manifest, path: Path) -> None:
    data = {
        "version": VERSION,
        "source": manifest.source,
        "fingerprint": manifest.fingerprint,
        "indexed": manifest.index_file is not None,
        "problems": [list(p) for p in manifest.problems],
        "utterances": [asdict(u) for u in manifest.utterances],
        "verified": manifest.verified,
    }
    with replaced_atomically(path) as partial:
        partial.write_text(json.dumps(data))


def _cached(location: str, path: Path) -> tuple[Manifest | None, Path | None]:
    """The newest readable manifest of ``location`` at ``path`` or at this user's :func:`own_place` for it, and
    where it is."""
    found = []
    for candidate in (path, own_place(path)):
        try:
            manifest = _read(candidate)
        except PermissionError as err:
            log.warning(
                "Cannot read the manifest %s (%s): this user keeps their own in %s. To share it, its owner can "
                "make it readable (chmod a+r %s), or set data.manifest_dir to a folder of your own.",
                candidate,
                err.strerror,
                own_place(path).parent,
                candidate,
            )
            continue
        if manifest is not None and manifest.source == location:
            found.append((candidate.stat().st_mtime_ns, candidate, manifest))
    if not found:
        return None, None
    _, where, manifest = max(found, key=lambda f: f[0])
    return manifest, where


def _writable(path: Path) -> Path:
    """``path``, or this user's own place for it when they cannot write in its folder."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if os.access(path.parent, os.W_OK) and (not path.exists() or os.access(path, os.R_OK)):
            return path
    except OSError:
        pass
    own = own_place(path)
    log.warning("Cannot write the manifest %s: it goes to %s instead", path, own)
    own.parent.mkdir(parents=True, exist_ok=True)
    return own


def write_manifest(manifest: Manifest) -> None:
    """Write ``manifest`` again where it was read from (or this user's own place for it, when they cannot write
    there)."""
    manifest.file = str(_writable(Path(manifest.file)))
    _write(manifest, Path(manifest.file))


def load_manifest(source: Source, location: str, path: str | Path, verify: bool = True) -> Manifest:
    """The manifest of ``source``'s ``location`` cached at ``path`` (or at this user's own place for it, when they
    cannot read it or write there); scanned and written when missing, or when ``verify`` finds that the location
    changed since. An archive's gzip index goes next to it (``.gzidx``). Files verified before and unchanged since
    stay verified."""
    path = Path(path).expanduser()
    cached, where = _cached(location, path)
    current = source.fingerprint(location) if verify or cached is None else None
    if cached is not None and current in (None, cached.fingerprint, UNKNOWN):
        cached.file = str(where)
        return cached
    start = time.perf_counter()
    path = _writable(path)
    manifest = source.scan(location, index_file_of(path))
    manifest.fingerprint = current
    if cached is not None:
        manifest.verified = {
            u.where: cached.verified[u.where] for u in manifest.utterances if u.where in cached.verified
        }
    manifest.file = str(path)
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
