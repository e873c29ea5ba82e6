"""OpenSLR ``.tar.gz`` archives read in one pass, from a file or an http(s) URL, without extracting them."""

from __future__ import annotations

import io
import os
import tarfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import soundfile as sf
from rich.progress import Progress

from asr.data.librispeech import Problem, Utterance, parse_transcripts, transcript_of


def is_url(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def is_archive(location: str) -> bool:
    return location.endswith((".tar.gz", ".tgz"))


def open_location(location: str) -> tuple[BinaryIO, int | None]:
    """A binary stream of a file or URL, and its size when known."""
    if not is_url(location):
        stream = open(Path(location).expanduser(), "rb")  # the caller closes it
        return stream, os.fstat(stream.fileno()).st_size
    try:
        response = urllib.request.urlopen(location, timeout=60)
    except urllib.error.URLError as err:
        raise FileNotFoundError(f"cannot open {location}: {getattr(err, 'code', '')} {err.reason}") from err
    return response, response.length


class _Counting:
    """A read-only stream that reports how many bytes went through it."""

    def __init__(self, stream: BinaryIO, advance: Callable[[int], object]) -> None:
        self.stream, self.advance = stream, advance

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.advance(len(data))
        return data


def _record(location: str, name: str, index: int, data: bytes, transcripts: dict[str, str],
            trans_name: str) -> tuple[Utterance, bytes] | Problem:
    where = f"{location}:{name}"
    utt_id = name.rpartition("/")[2].removesuffix(".flac")
    text = transcript_of(utt_id, where, transcripts, trans_name)
    if isinstance(text, Problem):
        return text
    try:
        info = sf.info(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError) as err:
        return Problem("unreadable audio", where, f"cannot read the audio header: {err}")
    speaker = utt_id.split("-", 1)[0]
    return Utterance(utt_id, location, text, speaker, info.frames, info.samplerate, name, index), data


def read_archive(location: str, shard: int = 0, shards: int = 1,
                 progress: Progress | None = None) -> Iterator[tuple[Utterance, bytes] | Problem]:
    """This shard's utterances with their FLAC bytes, and its problems, as the archive streams by.

    Audio member ``k`` (counting the archive's ``.flac`` members from 0) belongs to shard ``k % shards``; the
    other shards' audio is passed over unread. Audio that comes before its chapter's ``*.trans.txt`` waits in
    memory until the transcript arrives; what still waits at the end has no transcript. Transcript lines
    without audio are reported by shard 0 only.
    """
    transcripts: dict[str, dict[str, str]] = {}  # chapter folder -> utterance id -> transcript
    trans_names: dict[str, str] = {}
    audio_ids: dict[str, set[str]] = {}
    waiting: dict[str, list[tuple[str, int, bytes]]] = {}  # chapter folder -> (member, index, bytes)
    index = -1
    stream, size = open_location(location)
    with stream:
        if progress is not None:
            task = progress.add_task(f"Scanning {location.rpartition('/')[2]}", total=size)
            stream = _Counting(stream, lambda n: progress.advance(task, n))
        with tarfile.open(fileobj=stream, mode="r|gz") as tar:
            for member in tar:
                chapter, _, name = member.name.rpartition("/")
                if not member.isfile():
                    continue
                if name.endswith(".flac"):
                    index += 1
                    audio_ids.setdefault(chapter, set()).add(name.removesuffix(".flac"))
                    if index % shards != shard:
                        continue
                    data = tar.extractfile(member).read()
                    if chapter in transcripts:
                        yield _record(location, member.name, index, data, transcripts[chapter],
                                      trans_names[chapter])
                    else:
                        waiting.setdefault(chapter, []).append((member.name, index, data))
                elif name.endswith(".trans.txt"):
                    text = tar.extractfile(member).read().decode("utf-8")
                    transcripts.setdefault(chapter, {}).update(parse_transcripts(text))
                    trans_names[chapter] = member.name
                    for audio_name, audio_index, data in waiting.pop(chapter, []):
                        yield _record(location, audio_name, audio_index, data, transcripts[chapter],
                                      member.name)
    for chapter, audio in waiting.items():
        for audio_name, _, _ in audio:
            yield Problem("audio without transcript", f"{location}:{audio_name}", f"no {chapter}/*.trans.txt")
    if shard == 0:
        for chapter, lines in transcripts.items():
            for utt_id in sorted(lines.keys() - audio_ids.get(chapter, set())):
                where = f"{location}:{trans_names[chapter]}"
                yield Problem("transcript without audio", where, f"{utt_id}.flac is missing")
