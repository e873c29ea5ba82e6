"""LibriSpeech's OpenSLR archives, not extracted: ``<root>/<part>.tar.gz``, or ``<url>/<part>.tar.gz`` over
http(s); read as streams, by region through a gzip index where one could be made (:mod:`asr.data.archive`)."""

from __future__ import annotations

import logging
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from asr.data.archive import read_archive, serves_ranges
from asr.data.librispeech import Problem, Utterance, progress_bar
from asr.data.manifest import UNKNOWN, Manifest
from asr.data.remote import is_url
from asr.data.sources.base import Source

log = logging.getLogger(__name__)


class ArchiveSource(Source):
    """Each part an OpenSLR ``.tar.gz``: in ``root``, or at ``url`` (e.g. https://www.openslr.org/resources/12)
    when that is set."""

    random_access = False

    def __init__(self, root: str, url: str | None = None) -> None:
        self.root = root
        self.url = url

    def location(self, part: str) -> str:
        if self.url:
            return f"{self.url.rstrip('/')}/{part}.tar.gz"
        return str(Path(self.root).expanduser() / f"{part}.tar.gz")

    def fingerprint(self, location: str) -> str:
        """A file's size and time; a URL's length, time and ETag from a HEAD request (:data:`UNKNOWN` when its
        server does not answer)."""
        if not is_url(location):
            path = Path(location)
            if not path.is_file():
                raise FileNotFoundError(f"{location} does not exist")
            stat = path.stat()
            return f"{stat.st_size}/{stat.st_mtime_ns}"
        try:
            request = urllib.request.Request(location, method="HEAD")
            with urllib.request.urlopen(request, timeout=30) as response:
                headers = response.headers
                return f"{headers.get('Content-Length')}/{headers.get('Last-Modified')}/{headers.get('ETag')}"
        except urllib.error.URLError as err:
            log.warning("Cannot check whether %s changed (%s)", location, err)
            return UNKNOWN

    def scan(self, location: str, index_to: Path) -> Manifest:
        """One pass over the archive; its gzip index is written to ``index_to`` on the way where it can be read in
        parts (a local file, or a URL whose server serves byte ranges)."""
        if is_url(location) and not serves_ranges(location):
            log.warning(
                "%s: the server does not serve byte ranges, so every stream shard will read the whole "
                "archive; download it first (python -m asr.data download) to read it in parts",
                location,
            )
            index_to = None
        utterances, problems = [], []
        with progress_bar() as progress:
            for record in read_archive(location, progress=progress, index_to=index_to):
                if isinstance(record, Problem):
                    problems.append(record)
                else:
                    utterances.append(record[0])
        return Manifest(location, "", utterances, problems, None if index_to is None else str(index_to))

    def open(self, utt: Utterance) -> str | BinaryIO:
        raise TypeError("archives are read as streams (StreamDataset), not by utterance")

    def missing(self, splits: Sequence[str]) -> str | None:
        if self.url:
            return None  # checked when streamed: no network access here
        absent = [
            self.location(part)
            for part in dict.fromkeys(p for split in splits for p in self.parts(split))
            if not Path(self.location(part)).is_file()
        ]
        if not absent:
            return None
        return (
            f"LibriSpeech archives are missing at data.root={self.root}: no {', '.join(absent)}. Download them "
            f"with `python -m asr.data download data.root={self.root}` (which keeps them there), or stream them "
            "with data.source.url=https://www.openslr.org/resources/12."
        )

    def reading(self, manifest: Manifest) -> str:
        if manifest.index_file is not None:
            return "in parts, through its gzip index"
        return "whole, by every shard (its server serves no byte ranges)"
