"""The Hugging Face copy of LibriSpeech (``openslr/librispeech_asr``) as a source, through the optional ``datasets``
library (``pip install -e ".[hf]"``).

A part is read from the dataset's ``all`` config, whose split names are LibriSpeech's with dots
(``train.clean.100``, ``validation.clean``, ``test.other``...), from the Hugging Face cache, a hub download or a
local copy of the dataset's folder. Only the files of the asked split are downloaded and prepared (``datasets``
would otherwise prepare every split of the config). Its rows become the same :class:`Utterance` records as the
folders and archives, with the row as ``index``; the FLAC bytes are decoded by our reader, not by ``datasets``.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import soundfile as sf

from asr.data.librispeech import DataError, Problem, Utterance, progress_bar
from asr.data.manifest import Manifest
from asr.data.sources.base import Source

PREFIX = "hf://"
CONFIG = "all"
_ROWS = 256  # rows read at a time by the scan (LibriSpeech rows hold about 200 kB of FLAC)


def location(dataset: str, part: str) -> str:
    """``hf://<dataset>#<split>``: LibriSpeech ``part`` (e.g. ``dev-clean``) in the Hugging Face dataset
    ``dataset``, a hub id or a folder."""
    split = "validation" + part.removeprefix("dev") if part.startswith("dev-") else part
    return f"{PREFIX}{dataset}#{split.replace('-', '.')}"


@functools.cache
def open_split(location: str):
    """The split as a ``datasets.Dataset`` (memory-mapped; opened once per process), audio left as FLAC bytes."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError(f'{location} needs the datasets library: pip install -e ".[hf]"') from err
    dataset, _, split = location.removeprefix(PREFIX).rpartition("#")
    files = datasets.load_dataset_builder(dataset, CONFIG).config.data_files or {}
    if split not in files:
        raise DataError(f"{location}: no split {split!r} in the {CONFIG!r} config of {dataset} ({sorted(files)})")
    table = datasets.load_dataset(dataset, CONFIG, data_files={split: list(files[split])}, split=split)
    return table.cast_column("audio", datasets.Audio(decode=False))


def fingerprint(location: str) -> str:
    """The sizes and times of the split's cache files: they change when the dataset is prepared again."""
    stats = (os.stat(f["filename"]) for f in open_split(location).cache_files)
    return ";".join(f"{s.st_size}/{s.st_mtime_ns}" for s in stats)


def _source(audio: dict) -> io.BytesIO | str | None:
    """What to decode: the row's embedded FLAC bytes (as in openslr/librispeech_asr), else the file it names;
    None when it has neither."""
    if audio.get("bytes"):
        return io.BytesIO(audio["bytes"])
    if audio.get("path") and os.path.isfile(audio["path"]):
        return audio["path"]
    return None


def _no_audio(audio: dict, where: str) -> Problem:
    return Problem("unreadable audio", where, f"no audio bytes in the row, and {audio.get('path')!r} is not a file")


def audio(split, utt: Utterance) -> io.BytesIO | str:
    """The audio of ``utt`` in ``split`` (:func:`open_split`), to decode. The row must still hold ``utt``: a
    manifest that no longer matches its split would otherwise pair audio with another utterance's transcript."""
    row = split[utt.index]
    if row["id"] != utt.id:
        raise DataError(
            f"{utt.where}: row {utt.index} of the split is {row['id']!r}, not this utterance; the "
            "manifest does not match the dataset, delete it to scan the split again"
        )
    value = row["audio"]
    source = _source(value)
    if source is None:
        raise DataError.of(_no_audio(value, utt.where))
    return source


def scan(location: str) -> tuple[list[Utterance], list[Problem]]:
    """Every row's id, transcript, speaker and audio header (read from the FLAC bytes); and the problems."""
    split = open_split(location)
    utterances, problems = [], []
    with progress_bar() as progress:
        task = progress.add_task(f"Scanning {location}", total=len(split))
        for start in range(0, len(split), _ROWS):
            rows = split[start : start + _ROWS]
            for k, (utt_id, text, speaker, flac) in enumerate(
                zip(rows["id"], rows["text"], rows["speaker_id"], rows["audio"], strict=True)
            ):
                where = f"{location}:{utt_id}"
                if not (text or "").strip():
                    problems.append(Problem("empty transcript", where, f"row {start + k} has no text"))
                    continue
                source = _source(flac)
                if source is None:
                    problems.append(_no_audio(flac, where))
                    continue
                try:
                    info = sf.info(source)
                except (sf.LibsndfileError, RuntimeError) as err:
                    problems.append(Problem("unreadable audio", where, f"cannot read the audio header: {err}"))
                    continue
                utterances.append(
                    Utterance(
                        utt_id,
                        location,
                        text,
                        str(speaker),
                        info.frames,
                        info.samplerate,
                        member=utt_id,
                        index=start + k,
                    )
                )
            progress.advance(task, len(rows["id"]))
    return utterances, problems


class HfSource(Source):
    """The parts of ``dataset``: a hub id (from the Hugging Face cache, else downloaded by ``datasets``) or a local
    copy of the dataset's folder."""

    def __init__(self, dataset: str = "openslr/librispeech_asr") -> None:
        self.dataset = dataset
        self._splits: dict = {}  # location -> the opened split, pickled by file name to DataLoader workers

    def location(self, part: str) -> str:
        return location(self.dataset, part)

    def fingerprint(self, location: str) -> str:
        return fingerprint(location)

    def scan(self, location: str, index_to: Path) -> Manifest:
        return Manifest(location, "", *scan(location))

    def preopen(self, utterances: Iterable[Utterance]) -> None:
        for path in {u.path for u in utterances} - self._splits.keys():
            self._splits[path] = open_split(path)

    def open(self, utt: Utterance) -> io.BytesIO | str:
        self.preopen([utt])
        return audio(self._splits[utt.path], utt)

    def missing(self, splits: Sequence[str]) -> str | None:
        """A hub id is left to ``datasets`` (from its cache, or downloaded); a folder must exist."""
        if importlib.util.find_spec("datasets") is None:
            return f'data.source.dataset={self.dataset} needs the datasets library: pip install -e ".[hf]".'
        if _is_path(self.dataset) and not Path(self.dataset).expanduser().is_dir():
            return (
                f"data.source.dataset={self.dataset} is not a folder (a local copy of openslr/librispeech_asr, "
                "or its hub id)."
            )
        return None


def _is_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).expanduser().exists()
