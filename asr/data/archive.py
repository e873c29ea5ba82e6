"""OpenSLR ``.tar.gz`` archives read in one pass, from a file or an http(s) URL, without extracting them; and
archives read in parts, through a gzip index made by the manifest scan: local files, and URLs whose server serves
byte ranges."""

from __future__ import annotations

import http.client
import io
import os
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import soundfile as sf
from indexed_gzip import IndexedGzipFile
from rich.progress import Progress

from asr.data.librispeech import DataError, Problem, Utterance, parse_transcripts, transcript_of
from asr.data.remote import RangedHttpFile, RangeError, is_url

# Uncompressed bytes between the gzip index's seek points: reading from a point inflates up to this much first.
# The index keeps a 32 KiB window per point: about 2 MB per GB of archive.
INDEX_SPACING = 16 << 20
_READ_BLOCK = 1 << 20  # bytes per read of an archive over HTTP by ranges


@contextmanager
def replaced_atomically(path: Path) -> Iterator[Path]:
    """A temporary file, unique to this writer, next to ``path``, that replaces it when written: readers never see
    a partial file, and concurrent writers (ranks, nodes on shared storage) do not collide."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(handle)
    try:
        yield Path(partial)
        # mkstemp's file is the writer's alone (0600): give it the mode of any new file, for the other users of
        # a shared corpus
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(partial, 0o666 & ~umask)
        os.replace(partial, path)
    finally:
        Path(partial).unlink(missing_ok=True)


def _cannot_open(url: str, err: urllib.error.URLError) -> FileNotFoundError:
    return FileNotFoundError(f"cannot open {url}: {getattr(err, 'code', '')} {err.reason}")


def serves_ranges(url: str) -> bool:
    """Whether the server of ``url`` serves it by byte ranges: one request, for its first byte."""
    try:
        RangedHttpFile(url).close()
    except RangeError:
        return False
    except urllib.error.URLError as err:
        raise _cannot_open(url, err) from err
    return True


def open_location(location: str) -> tuple[BinaryIO, int | None]:
    """A binary stream of a file or URL, and its size when known. A URL is read by byte ranges where its server
    serves them (:class:`RangedHttpFile`: it can seek, and a dropped transfer resumes), buffered so that small
    reads do not each take a network round; else as one response."""
    if not is_url(location):
        stream = open(Path(location).expanduser(), "rb")  # the caller closes it
        return stream, os.fstat(stream.fileno()).st_size
    try:
        try:
            ranged = RangedHttpFile(location)
            return io.BufferedReader(ranged, _READ_BLOCK), ranged.size
        except RangeError:
            response = urllib.request.urlopen(location, timeout=60)
            return response, response.length
    except urllib.error.URLError as err:
        raise _cannot_open(location, err) from err


class _Counting:
    """A read-only stream that reports how far it has been read (a file's reader may seek back and forth)."""

    def __init__(self, stream: BinaryIO, report: Callable[[int], object]) -> None:
        self.stream, self.report, self.position = stream, report, 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.position += len(data)
        self.report(self.position)
        return data

    def seekable(self) -> bool:
        return self.stream.seekable()

    def seek(self, offset: int, whence: int = 0) -> int:
        self.position = self.stream.seek(offset, whence)
        return self.position

    def tell(self) -> int:
        return self.position


def _record(
    location: str, member: tarfile.TarInfo, index: int, data: bytes, transcripts: dict[str, str], trans_name: str
) -> tuple[Utterance, bytes] | Problem:
    where, name = f"{location}:{member.name}", member.name.rpartition("/")[2]
    utt_id = name.removesuffix(".flac")
    text = transcript_of(utt_id, where, transcripts, trans_name)
    if isinstance(text, Problem):
        return text
    audio = io.BytesIO(data)
    try:
        info = sf.info(audio)
    except (sf.LibsndfileError, RuntimeError) as err:
        return Problem(
            "unreadable audio", where, f"cannot read the audio header: {str(err).replace(repr(audio), name)}"
        )
    speaker = utt_id.split("-", 1)[0]
    return Utterance(
        utt_id,
        location,
        text,
        speaker,
        info.frames,
        info.samplerate,
        member.name,
        index,
        member.offset_data,
        member.size,
    ), data


def _check_end(tar: tarfile.TarFile, location: str) -> None:
    """tarfile ends the archive at the first block that is not a valid header, so a damaged archive would end
    early: what follows that block must be the zero blocks that end a tar archive, and nothing else."""
    zeros = 0
    while chunk := tar.fileobj.read(1 << 16):
        if chunk.count(0) != len(chunk):
            raise DataError(
                f"{location}: damaged archive: an invalid tar header at byte {tar.offset} of its "
                f"contents, and data after it"
            )
        zeros += len(chunk)
    if zeros < tarfile.BLOCKSIZE:
        raise DataError(f"{location}: truncated archive: it ends without tar's end-of-archive blocks")


def read_archive(
    location: str, shard: int = 0, shards: int = 1, progress: Progress | None = None, index_to: Path | None = None
) -> Iterator[tuple[Utterance, bytes] | Problem]:
    """This shard's utterances with their FLAC bytes, and its problems, as the archive streams by.

    Audio member ``k`` (counting the archive's ``.flac`` members from 0) belongs to shard ``k % shards``; the
    other shards' audio is passed over unread. Audio that comes before its chapter's ``*.trans.txt`` waits in
    memory until the transcript arrives; what still waits at the end has no transcript. Transcript lines
    without audio are reported by shard 0 only. With ``index_to`` (a local archive, or a URL served by byte
    ranges: :func:`serves_ranges`), a gzip index of the archive
    is written there at the end, for :func:`read_members`.
    """
    transcripts: dict[str, dict[str, str]] = {}  # chapter folder -> utterance id -> transcript
    trans_names: dict[str, str] = {}
    audio_ids: dict[str, set[str]] = {}
    waiting: dict[str, list[tuple[tarfile.TarInfo, int, bytes]]] = {}  # chapter folder -> (member, index, bytes)
    index = -1
    stream, size = open_location(location)
    with ExitStack() as stack:
        stack.enter_context(stream)
        if progress is not None:
            task = progress.add_task(f"Scanning {location.rpartition('/')[2]}", total=size)
            stream = _Counting(stream, lambda n: progress.update(task, completed=n))
        indexer = None  # reads the gzip stream for tarfile, and indexes it
        if index_to is not None:
            indexer = stack.enter_context(IndexedGzipFile(fileobj=stream, spacing=INDEX_SPACING))
        try:
            tar = stack.enter_context(
                tarfile.open(fileobj=stream if indexer is None else indexer, mode="r|gz" if indexer is None else "r|")
            )
            for member in tar:
                tar.members = []  # a stream reads each member once: keep no list of them (0.5 KB each)
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
                        yield _record(location, member, index, data, transcripts[chapter], trans_names[chapter])
                    else:
                        waiting.setdefault(chapter, []).append((member, index, data))
                elif name.endswith(".trans.txt"):
                    found, repeated = parse_transcripts(tar.extractfile(member).read(), f"{location}:{member.name}")
                    transcripts[chapter] = {**found, **transcripts.get(chapter, {})}  # an id's first line is kept
                    trans_names.setdefault(chapter, member.name)
                    if shard == 0:
                        yield from repeated
                    for audio, audio_index, data in waiting.pop(chapter, []):
                        yield _record(location, audio, audio_index, data, transcripts[chapter], member.name)
            _check_end(tar, location)
        except (tarfile.TarError, zlib.error, EOFError) as err:
            raise DataError(f"{location}: damaged or truncated archive ({err})") from err
        except OSError as err:  # indexed_gzip's errors (a bad checksum included), or the network's or disk's
            what = "damaged or truncated archive" if indexer is not None else "reading failed"
            raise DataError(f"{location}: {what} ({err})") from err
        if indexer is not None:
            with replaced_atomically(index_to) as partial:
                indexer.export_index(str(partial))
    for chapter, audio in waiting.items():
        for member, _, _ in audio:
            yield Problem("audio without transcript", f"{location}:{member.name}", f"no {chapter}/*.trans.txt")
    if shard == 0:
        for chapter, lines in transcripts.items():
            for utt_id in sorted(lines.keys() - audio_ids.get(chapter, set())):
                where = f"{location}:{trans_names[chapter]}:{utt_id}"
                yield Problem("transcript without audio", where, f"{utt_id}.flac is missing")


@dataclass(frozen=True)
class IndexedRegions:
    """An archive read through its gzip index: the stream shards' utterances, each a contiguous region."""

    index_file: str
    shards: dict[int, list[Utterance]]


def cut_regions(utterances: Sequence[Utterance], shards: int) -> list[list[Utterance]]:
    """``utterances`` (in stream order) cut into ``shards`` contiguous regions of about equal audio duration:
    each shard then inflates only its own part of the archive, and all reach the end of an epoch together."""
    total = sum(u.duration for u in utterances)
    regions: list[list[Utterance]] = [[] for _ in range(shards)]
    start = 0.0
    for utt in utterances:
        regions[min(shards - 1, int(start * shards / total))].append(utt)
        start += utt.duration
    return regions


def read_members(location: str, index_file: str, utterances: Sequence[Utterance]) -> Iterator[tuple[Utterance, bytes]]:
    """The FLAC bytes of archive members, found through the archive's gzip index, in the order given (in stream
    order, nothing is inflated twice; a region read from a later start seeks back once, to its beginning)."""
    if not utterances:
        return
    changed = "the archive changed since its manifest was written; delete the manifest to scan it again"
    try:
        with ExitStack() as stack:
            if is_url(location):
                stream = stack.enter_context(open_location(location)[0])
                if not stream.seekable():
                    raise DataError(
                        f"{location}: the server no longer serves byte ranges, which reading it through "
                        "its gzip index needs"
                    )
                f = stack.enter_context(IndexedGzipFile(fileobj=stream, index_file=index_file))
            else:  # by name: indexed_gzip then opens and closes its own file handles
                f = stack.enter_context(IndexedGzipFile(str(Path(location).expanduser()), index_file=index_file))
            for utt in utterances:
                f.seek(utt.offset)
                data = f.read(utt.size)
                if len(data) < utt.size or not data.startswith((b"fLaC", b"ID3")):
                    raise DataError(f"{utt.where}: no FLAC file at its recorded place; {changed}")
                yield utt, data
    except (OSError, http.client.HTTPException) as err:  # indexed_gzip's, the disk's or the network's
        cause = err.__cause__  # what reading the file raised, under indexed_gzip's error
        if cause is not None and not isinstance(cause, Exception):  # KeyboardInterrupt, say
            raise cause from None
        if cause is not None:
            raise DataError(f"{location}: reading failed ({cause})") from err
        raise DataError(
            f"{location}: cannot read it through its gzip index {index_file} ({err}); if {changed}"
        ) from err
