"""Archives read in one pass, from a file and over HTTP, and in parts through a gzip index; damage named."""

import dataclasses
import gzip
import io
import tarfile
import urllib.request
from pathlib import Path

import indexed_gzip
import pytest

import asr.data.archive as archive_module
from asr.data.archive import cut_regions, read_archive, read_members, serves_ranges
from asr.data.librispeech import DataError, Problem, scan_directory
from asr.data.manifest import load_manifest
from asr.data.remote import RangedHttpFile
from asr.data.sources.archive import ArchiveSource
from tests.helpers import (
    CHECK_PROBLEMS,
    SOURCE_PROBLEMS,
    USABLE,
    FolderHandler,
    big_archive,
    key,
    make_archive,
    scanned,
    write_corpus,
)


def read_all(location, shard=0, shards=1):
    records = list(read_archive(location, shard, shards))
    problems = [r for r in records if isinstance(r, Problem)]
    return [r[0] for r in records if not isinstance(r, Problem)], problems


@pytest.mark.parametrize("transcripts_first", [False, True])
def test_archive_file_gives_what_the_folder_gives(tmp_path, transcripts_first):
    folder = write_corpus(tmp_path)
    archive = make_archive(tmp_path, "dev-clean", tmp_path / "dev-clean.tar.gz", transcripts_first)
    utterances, problems = read_all(str(archive))
    expected, expected_problems = scan_directory(folder)

    def facts(found):
        return sorted((u.id, u.transcript, u.num_samples, u.sample_rate, u.speaker) for u in found)

    assert facts(utterances) == facts(expected)
    assert {key(p): p.reason for p in problems} == SOURCE_PROBLEMS
    assert {key(p): p.reason for p in expected_problems} == SOURCE_PROBLEMS
    first = next(u for u in utterances if u.id == "84-121123-0000")
    assert first.path == str(archive)
    assert first.member == "LibriSpeech/dev-clean/84/121123/84-121123-0000.flac"


def test_archive_over_http(tmp_path, serve):
    www, url = serve
    write_corpus(tmp_path)
    make_archive(tmp_path, "dev-clean", www / "dev-clean.tar.gz")
    utterances, problems = read_all(f"{url}/dev-clean.tar.gz")
    assert {u.id: u.transcript for u in utterances if u.id in USABLE} == USABLE
    assert {u.id for u in utterances} == {*USABLE, *CHECK_PROBLEMS}
    assert {key(p): p.reason for p in problems} == SOURCE_PROBLEMS
    with pytest.raises(FileNotFoundError, match="missing.tar.gz"):
        read_all(f"{url}/missing.tar.gz")


def test_a_stream_over_http_survives_a_dropped_connection(tmp_path, serve, monkeypatch):
    www, url = serve
    monkeypatch.setattr(RangedHttpFile, "BACKOFF", 0.0)
    write_corpus(tmp_path)
    make_archive(tmp_path, "dev-clean", www / "dev-clean.tar.gz")

    def read():
        utterances, problems = read_all(f"{url}/dev-clean.tar.gz")
        return utterances, [p[:2] for p in problems]  # a detail may name a buffer's address

    expected = read()
    FolderHandler.starts.clear()
    FolderHandler.cuts[:] = [1, 5_000]  # the size probe (1 byte) whole, then the stream cut after 5,000 bytes
    assert read() == expected
    assert FolderHandler.starts == [0, 0, 5_000]


def test_shards_split_the_archive_without_overlap(tmp_path):
    write_corpus(tmp_path)
    archive = str(make_archive(tmp_path, "dev-clean", tmp_path / "dev-clean.tar.gz"))
    shards = [read_all(archive, shard, 3) for shard in range(3)]
    ids = [u.id for utterances, _ in shards for u in utterances]
    assert sorted(ids) == sorted([*USABLE, *CHECK_PROBLEMS])
    problems = [key(p) for _, found in shards for p in found]
    assert sorted(problems) == sorted(SOURCE_PROBLEMS)


def test_members_read_through_the_index_are_the_streamed_bytes(tmp_path):
    write_corpus(tmp_path)
    archive = str(make_archive(tmp_path, "dev-clean", tmp_path / "dev-clean.tar.gz"))
    streamed = {utt.id: data for utt, data in (r for r in read_archive(archive) if not isinstance(r, Problem))}
    manifest = load_manifest(ArchiveSource(str(tmp_path)), archive, tmp_path / "m.json")
    assert {utt.id: data for utt, data in read_members(archive, manifest.index_file, manifest.utterances)} == streamed
    with pytest.raises(DataError, match=r"dev-clean\.tar\.gz: cannot read it through its gzip index"):
        list(read_members(archive, str(tmp_path / "missing.gzidx"), manifest.utterances))
    # A member that is not where the manifest says (an archive changed without changing size) is named.
    moved = [dataclasses.replace(manifest.utterances[0], offset=manifest.utterances[0].offset + 512)]
    with pytest.raises(DataError, match=r"\.flac: no FLAC file at its recorded place; the archive changed"):
        list(read_members(archive, manifest.index_file, moved))


def test_a_region_is_read_without_inflating_the_archive_before_it(tmp_path, monkeypatch):
    """Shard 2 of 3 reads its members through a seek point after the damaged start of the archive, which
    streaming has to inflate."""
    monkeypatch.setattr(archive_module, "INDEX_SPACING", 64 << 10)
    archive, _ = big_archive(tmp_path, chapters=6, per_chapter=20)
    manifest = scanned(archive, tmp_path)
    regions = cut_regions(manifest.utterances, 3)
    assert [u for region in regions for u in region] == manifest.utterances  # contiguous, in stream order
    durations = [sum(u.duration for u in region) for region in regions]
    assert max(durations) - min(durations) < 2 * max(u.duration for u in manifest.utterances)
    region = regions[2]
    expected = {utt.id: data for utt, data in read_members(archive, manifest.index_file, region)}
    with indexed_gzip.IndexedGzipFile(archive, index_file=manifest.index_file) as f:
        points = list(f.seek_points())  # (uncompressed, compressed) offsets
    start = max(compressed for uncompressed, compressed in points if uncompressed <= region[0].offset)
    assert start > 100_000
    data = bytearray(Path(archive).read_bytes())
    data[20_000 : start - 20_000] = bytes(start - 40_000)
    Path(archive).write_bytes(data)
    assert {utt.id: data for utt, data in read_members(archive, manifest.index_file, region)} == expected
    with pytest.raises(DataError, match=r"train-clean-100\.tar\.gz: damaged"):
        list(read_archive(archive, 2, 3))


def test_an_archive_over_http_is_read_in_parts_by_byte_ranges(tmp_path, serve):
    """Scanned over HTTP, the archive gets a gzip index; a shard's region is then fetched from the seek point
    before it, not from the start, and an archive that changes while it is read is an error."""
    www, url = serve
    archive, _ = big_archive(tmp_path, chapters=6, per_chapter=20)
    (www / "train-clean-100.tar.gz").write_bytes(Path(archive).read_bytes())
    location = f"{url}/train-clean-100.tar.gz"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(archive_module, "INDEX_SPACING", 64 << 10)
        manifest = load_manifest(
            ArchiveSource(str(tmp_path), url), location, tmp_path / "manifests" / "train-clean-100.json"
        )
    assert manifest.index_file is not None
    streamed = {utt.id: data for utt, data in (r for r in read_archive(archive) if not isinstance(r, Problem))}
    region = cut_regions(manifest.utterances, 3)[2]
    with indexed_gzip.IndexedGzipFile(archive, index_file=manifest.index_file) as f:
        start = max(compressed for uncompressed, compressed in f.seek_points() if uncompressed <= region[0].offset)
    assert start > 100_000
    FolderHandler.starts.clear()
    assert {utt.id: data for utt, data in read_members(location, manifest.index_file, region)} == {
        utt.id: streamed[utt.id] for utt in region
    }
    assert FolderHandler.starts == [0, start]  # the size, then the region from its seek point on

    wrapped = read_members(location, manifest.index_file, region[5:] + region[:5])  # as a region read from a start
    next(wrapped)
    served = bytearray(Path(archive).read_bytes())  # replaced by a file of the same size: its ETag changes
    served[1000:2000] = bytes(1000)
    (www / "train-clean-100.tar.gz").write_bytes(served)
    with pytest.raises(
        DataError,
        match=r"train-clean-100\.tar\.gz: reading failed \(.*the server sent the whole "
        r"file for a range: it changed since it was opened",
    ):
        list(wrapped)


@pytest.mark.parametrize("ranges", [True, False])
def test_asking_whether_a_server_serves_ranges_takes_one_request(tmp_path, serve, monkeypatch, ranges):
    www, url = serve
    (www / "a.tar.gz").write_bytes(bytes(1 << 20))
    monkeypatch.setattr(FolderHandler, "ranges", ranges)
    answers = []
    urlopen = urllib.request.urlopen

    def counted(*args, **kwargs):
        answers.append(urlopen(*args, **kwargs))
        return answers[-1]

    monkeypatch.setattr(urllib.request, "urlopen", counted)
    assert serves_ranges(f"{url}/a.tar.gz") == ranges
    assert FolderHandler.starts == ([0] if ranges else [])
    assert len(answers) == 1 and answers[0].status == (206 if ranges else 200) and answers[0].closed
    with pytest.raises(FileNotFoundError, match="cannot open .*missing.tar.gz: 404"):
        serves_ranges(f"{url}/missing.tar.gz")


@pytest.mark.parametrize("damage", ["truncated", "zeroed", "header"])
@pytest.mark.parametrize("with_index", [False, True])
def test_a_damaged_archive_is_an_error_that_names_it(tmp_path, damage, with_index):
    """tarfile alone takes a damaged header for the end of the archive, which would drop the rest silently."""
    archive, _ = big_archive(tmp_path)
    data = Path(archive).read_bytes()
    middle = len(data) // 2
    if damage == "header":  # a valid gzip stream whose tar has a zeroed header halfway through
        tar = gzip.decompress(data)
        with tarfile.open(fileobj=io.BytesIO(tar)) as members:
            offset = members.getmembers()[len(members.getmembers()) // 2].offset
        data = gzip.compress(tar[:offset] + bytes(tarfile.BLOCKSIZE) + tar[offset + tarfile.BLOCKSIZE :])
    else:
        data = data[:middle] if damage == "truncated" else data[:middle] + bytes(50_000) + data[middle + 50_000 :]
    Path(archive).write_bytes(data)
    expected = "damaged archive: an invalid tar header" if damage == "header" else "(damaged|truncated)"
    with pytest.raises(DataError, match=rf"train-clean-100\.tar\.gz: {expected}"):
        list(read_archive(archive, index_to=tmp_path / "i.gzidx" if with_index else None))


def test_a_bad_gzip_checksum_is_found_by_the_indexed_scan(tmp_path):
    archive, _ = big_archive(tmp_path)
    data = bytearray(Path(archive).read_bytes())
    data[-8:-4] = bytes(4)  # the gzip trailer's CRC-32
    Path(archive).write_bytes(data)
    with pytest.raises(DataError, match=r"train-clean-100\.tar\.gz: damaged or truncated archive"):
        list(read_archive(archive, index_to=tmp_path / "i.gzidx"))
    assert not (tmp_path / "i.gzidx").exists()


def test_a_network_error_while_streaming_names_the_url(tmp_path, monkeypatch):
    write_corpus(tmp_path)
    data = make_archive(tmp_path, "dev-clean", tmp_path / "dev-clean.tar.gz").read_bytes()

    class TimesOut(io.BytesIO):
        def read(self, size=-1):
            if self.tell() > len(data) // 2:
                raise TimeoutError("timed out")
            return super().read(size)

    monkeypatch.setattr(archive_module, "open_location", lambda location: (TimesOut(data), len(data)))
    with pytest.raises(DataError, match=r"http://host/dev-clean\.tar\.gz: reading failed \(timed out\)"):
        list(read_archive("http://host/dev-clean.tar.gz"))
