"""LibriSpeech as extracted from the OpenSLR archives: ``<root>/LibriSpeech/<part>/<speaker>/<chapter>/``."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from asr.data.librispeech import scan_directory, split_dir
from asr.data.manifest import Manifest
from asr.data.sources.base import Source


class FolderSource(Source):
    """Split folders of FLAC files and ``*.trans.txt`` transcripts, read at random; scanned with ``scan_workers``
    processes when large."""

    def __init__(self, root: str, scan_workers: int = 8) -> None:
        self.root = root
        self.scan_workers = scan_workers

    def location(self, part: str) -> str:
        return str(split_dir(self.root, part))

    def fingerprint(self, location: str) -> str:
        """The names, sizes, times, permissions and owners of the folder's files (of a dangling link: the
        link's): a file made readable since, or a link mended, is scanned again."""
        path = Path(location)
        if not path.is_dir():
            raise FileNotFoundError(self.missing([path.name]) or f"{location} is not a directory")
        digest = hashlib.sha1()
        for folder, subfolders, files in os.walk(path):
            subfolders.sort()
            digest.update(f"{folder}\0{os.stat(folder).st_mode}\n".encode())
            for name in sorted(files):
                file = os.path.join(folder, name)
                stat = os.stat(file) if os.path.exists(file) else os.lstat(file)
                facts = (stat.st_size, stat.st_mtime_ns, stat.st_mode, stat.st_uid, stat.st_gid)
                digest.update(f"{file}\0{facts}\n".encode())
        return digest.hexdigest()

    def scan(self, location: str, index_to: Path) -> Manifest:
        return Manifest(location, "", *scan_directory(location, self.scan_workers))

    def missing(self, splits: Sequence[str]) -> str | None:
        absent = [
            part
            for part in dict.fromkeys(p for split in splits for p in self.parts(split))
            if not split_dir(self.root, part).is_dir()
        ]
        if not absent:
            return None
        root = Path(self.root).expanduser()
        archives = [f"{root / part}.tar.gz" for part in absent if (root / f"{part}.tar.gz").is_file()]
        if archives:
            return (
                f"LibriSpeech {', '.join(absent)} is not extracted in {split_dir(self.root, '')}, but "
                f"{', '.join(archives)} exists: read the archives as they are with data/source=archive, or "
                f"extract them with `python -m asr.data download data.root={self.root}`."
            )
        return (
            f"LibriSpeech is missing at data.root={self.root}: no {', '.join(absent)} in "
            f"{split_dir(self.root, '').resolve()}. Download it with `python -m asr.data download data.root=DIR`, "
            "then pass data.root=DIR; or read the OpenSLR archives without extracting them with "
            "data/source=archive (<part>.tar.gz files in data.root, or streamed with "
            "data.source.url=https://www.openslr.org/resources/12); or the Hugging Face copy with data/source=hf "
            '(pip install -e ".[hf]").'
        )
