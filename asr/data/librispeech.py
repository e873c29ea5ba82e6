"""LibriSpeech records and split names, and reading a split folder
``<root>/LibriSpeech/<split>/<speaker>/<chapter>/``."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import NamedTuple

import soundfile as sf
from rich.console import Console
from rich.progress import Progress

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000  # LibriSpeech, and what the pretrained encoders expect
UNIONS = {"train-960": ("train-clean-100", "train-clean-360", "train-other-500")}


def parts(split: str) -> tuple[str, ...]:
    """The LibriSpeech parts (one folder or archive each) that a configured split name stands for."""
    return UNIONS.get(split, (split,))


@dataclass(frozen=True)
class Utterance:
    id: str
    path: str  # the audio file, or the archive (or Hugging Face split, asr.data.sources.hf) that holds ``member``
    transcript: str
    speaker: str
    num_samples: int
    sample_rate: int
    member: str | None = None  # the audio's name inside the archive ``path`` (a Hugging Face split: its id)
    # The audio's position among the archive's audio members, which picks its stream shard (Hugging Face: its row)
    index: int = 0
    # Where the member's bytes are in the uncompressed archive, and how many (read through a gzip index)
    offset: int = 0
    size: int = 0

    @property
    def duration(self) -> float:
        return self.num_samples / self.sample_rate

    @property
    def where(self) -> str:
        return self.path if self.member is None else f"{self.path}:{self.member}"


class Problem(NamedTuple):
    reason: str  # what skips are counted under
    where: str  # the file, archive member or row of one utterance (of a transcript line: "<trans.txt>:<id>")
    detail: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason} ({self.detail})"

    @property
    def id(self) -> str:
        """The utterance's id: its audio file's (or member's, or row's) name, or its transcript line's id."""
        return Path(self.where.rpartition(":")[2]).name.removesuffix(".flac")


class DataError(ValueError):
    """An input is unusable; the message names the file and the problem."""

    # ``DataError(message)`` must do: DataLoader workers re-raise exceptions that way.
    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.problem: Problem | None = None

    @classmethod
    def of(cls, problem: Problem) -> DataError:
        error = cls(str(problem), problem.reason)
        error.problem = problem
        return error


def apply_policy(problems: list[Problem], on_error: str) -> list[Problem]:
    """Raise on the first problem (``on_error="raise"``), else return them, to be skipped and counted."""
    if problems and on_error == "raise":
        raise DataError.of(problems[0])
    return problems


def split_dir(root: str | Path, split: str) -> Path:
    return Path(root).expanduser() / "LibriSpeech" / split


def parse_transcripts(data: bytes, name: str) -> tuple[dict[str, str | Problem], list[Problem]]:
    """``<id> <TRANSCRIPT>`` lines of the transcript file ``name`` (UTF-8, with or without a byte-order mark, any
    line ends, words apart by spaces or tabs): each id's transcript (``""`` when nothing follows it), or
    the :class:`Problem` of a line that is not UTF-8, for its audio. An id given again is a problem of its own;
    the first line of an id is the one kept."""
    transcripts: dict[str, str | Problem] = {}
    lines: dict[str, int] = {}
    repeated = []
    for number, line in enumerate(data.removeprefix(b"\xef\xbb\xbf").splitlines(), 1):
        fields = line.split(None, 1)
        if not fields:
            continue
        key, text = fields[0].decode("utf-8", "backslashreplace"), fields[1] if len(fields) > 1 else b""
        if key in lines:
            detail = f"line {number} repeats the id of line {lines[key]}, which is kept"
            repeated.append(Problem("duplicate transcript line", f"{name}:{key}", detail))
            continue
        lines[key] = number
        try:
            transcripts[key] = " ".join(text.decode("utf-8").split())
        except UnicodeDecodeError as err:
            detail = f"line {number} of {name} is not UTF-8 (byte 0x{text[err.start]:02x}; saved as Latin-1?)"
            transcripts[key] = Problem("transcript not UTF-8", "", detail)
    return transcripts, repeated


def transcript_of(utt_id: str, where: str, transcripts: dict[str, str | Problem], trans_file: str) -> str | Problem:
    """The transcript of the audio ``where``, or why it has none."""
    text = transcripts.get(utt_id)
    if text is None:
        return Problem("audio without transcript", where, f"no line for {utt_id} in {trans_file}")
    if isinstance(text, Problem):
        return text._replace(where=where)
    return text or Problem("empty transcript", where, f"the line for {utt_id} in {trans_file} is empty")


def read_header(path: str) -> tuple[int, int] | str:
    """(samples, sample rate) from the audio header alone, or why it cannot be read."""
    try:
        info = sf.info(path)
    except (sf.LibsndfileError, RuntimeError) as err:
        return str(err)
    return info.frames, info.samplerate


def progress_bar() -> Progress:
    """A progress bar on stderr, shown on a terminal only (logs get a summary line), gone when done."""
    console = Console(stderr=True)
    return Progress(console=console, transient=True, disable=not console.is_terminal)


def _read_headers(paths: list[str]) -> list[tuple[int, int] | str]:
    return [read_header(p) for p in paths]


_CHUNK = 500  # files per task of the parallel header scan
_PARALLEL_FROM = 20_000  # files; fewer are read in a few seconds, faster than starting processes


def read_headers(paths: list[str], workers: int, label: str) -> list[tuple[int, int] | str]:
    """Headers of many files, in a process pool when there are enough of them, with a progress bar."""
    chunks = [paths[i : i + _CHUNK] for i in range(0, len(paths), _CHUNK)]
    results: list[tuple[int, int] | str] = []
    with progress_bar() as progress, ExitStack() as stack:
        task = progress.add_task(f"Scanning {label}", total=len(paths))
        mapped = map(_read_headers, chunks)
        if workers > 1 and len(paths) >= _PARALLEL_FROM:
            pool = ProcessPoolExecutor(min(workers, len(chunks)), mp_context=get_context("spawn"))
            stack.enter_context(pool)
            mapped = pool.map(_read_headers, chunks)
        for chunk in mapped:
            results.extend(chunk)
            progress.advance(task, len(chunk))
    return results


def scan_directory(directory: str | Path, workers: int = 1) -> tuple[list[Utterance], list[Problem]]:
    """A split folder's utterances, sorted by id, from transcripts and audio headers; and its problems."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"LibriSpeech split not found: {directory} is not a directory")
    matched: list[tuple[str, str, str]] = []
    problems: list[Problem] = []
    for chapter in sorted(p for p in directory.glob("*/*") if p.is_dir()):
        audio = {p.stem: str(p) for p in chapter.glob("*.flac")}
        trans_files = sorted(chapter.glob("*.trans.txt"))
        trans_file = str(trans_files[0]) if trans_files else f"{chapter}/*.trans.txt"
        transcripts: dict[str, str | Problem] = {}
        for f in trans_files:
            try:
                found, repeated = parse_transcripts(f.read_bytes(), str(f))
            except OSError as err:
                unreadable = Problem("unreadable transcript", "", f"cannot read {f}: {err.strerror}")
                found, repeated = dict.fromkeys(audio, unreadable), []
            transcripts = {**found, **transcripts}  # the first file's line of an id is kept
            problems += repeated
        problems += [
            Problem("transcript without audio", f"{trans_file}:{utt_id}", f"{utt_id}.flac is missing")
            for utt_id in sorted(transcripts.keys() - audio.keys())
        ]
        for utt_id, path in sorted(audio.items()):
            text = transcript_of(utt_id, path, transcripts, trans_file)
            if not os.path.exists(path):
                text = Problem("dangling symlink", path, f"it points to {os.readlink(path)}, which does not exist")
            if isinstance(text, Problem):
                problems.append(text)
            else:
                matched.append((utt_id, path, text))
    utterances = []
    headers = read_headers([path for _, path, _ in matched], workers, directory.name)
    for (utt_id, path, text), header in zip(matched, headers, strict=True):
        if isinstance(header, str):
            problems.append(Problem("unreadable audio", path, f"cannot read the audio header: {header}"))
        else:
            utterances.append(Utterance(utt_id, path, text, utt_id.split("-", 1)[0], *header))
    utterances.sort(key=lambda u: u.id)
    return utterances, problems
