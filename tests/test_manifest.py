"""Manifests: written once by a scan, reused while the source is unchanged, rescanned when it changes."""

import json
import os

import pytest

from asr.data.manifest import load_manifest
from asr.data.sources.archive import ArchiveSource
from asr.data.sources.folder import FolderSource
from tests.helpers import CHECK_PROBLEMS, SOURCE_PROBLEMS, USABLE, FolderHandler, key, make_archive, write_corpus


@pytest.fixture
def scans(monkeypatch):
    """Counts the scans that load_manifest has the sources run."""
    calls = []
    for source in (FolderSource, ArchiveSource):

        def counted(self, location, index_to, scan=source.scan):
            calls.append(location)
            return scan(self, location, index_to)

        monkeypatch.setattr(source, "scan", counted)
    return calls


def test_folder_manifest_is_written_reused_and_refreshed(tmp_path, scans):
    folder = str(write_corpus(tmp_path))
    source = FolderSource(str(tmp_path))
    path = tmp_path / "manifests" / "dev-clean.json"
    first = load_manifest(source, folder, path)
    assert sorted(u.id for u in first.utterances) == sorted([*USABLE, *CHECK_PROBLEMS])
    assert {key(p): p.reason for p in first.problems} == SOURCE_PROBLEMS
    saved = json.loads(path.read_text())
    assert saved["source"] == folder and len(saved["utterances"]) == len(first.utterances)
    fields = {"id", "path", "transcript", "speaker", "num_samples", "sample_rate"}
    assert fields <= saved["utterances"][0].keys()

    again = load_manifest(source, folder, path)
    assert again.utterances == first.utterances and again.problems == first.problems
    assert len(scans) == 1
    flac = tmp_path / "LibriSpeech" / "dev-clean" / "84" / "121123" / "84-121123-0000.flac"
    os.utime(flac, ns=(0, 0))
    assert load_manifest(source, folder, path, verify=False).utterances == first.utterances  # trusted as is
    assert len(scans) == 1
    load_manifest(source, folder, path)  # a file changed: scanned again
    assert len(scans) == 2


def test_archive_manifest_keeps_stream_order_and_members(tmp_path, scans):
    write_corpus(tmp_path)
    archive = make_archive(tmp_path, "dev-clean", tmp_path / "dev-clean.tar.gz")
    path = tmp_path / "m.json"
    source = ArchiveSource(str(tmp_path))
    manifest = load_manifest(source, str(archive), path)
    assert [u.index for u in manifest.utterances] == sorted(u.index for u in manifest.utterances)
    assert all(u.path == str(archive) and u.member.endswith(f"/{u.id}.flac") for u in manifest.utterances)
    assert manifest.index_file == str(tmp_path / "m.gzidx") and (tmp_path / "m.gzidx").is_file()
    assert load_manifest(source, str(archive), path).utterances == manifest.utterances
    assert len(scans) == 1
    (tmp_path / "m.gzidx").unlink()  # a manifest without its index is scanned again
    assert load_manifest(source, str(archive), path, verify=False).index_file == manifest.index_file
    assert len(scans) == 2 and (tmp_path / "m.gzidx").is_file()
    make_archive(tmp_path, "dev-clean", archive, transcripts_first=True)
    os.utime(archive, ns=(1, 1))
    load_manifest(source, str(archive), path)
    assert len(scans) == 3
    folder = str(tmp_path / "LibriSpeech" / "dev-clean")
    # another source for the same manifest path
    assert load_manifest(FolderSource(str(tmp_path)), folder, path).source == folder
    assert len(scans) == 4


@pytest.mark.parametrize("ranges", [True, False])
def test_url_manifest_is_checked_with_head(tmp_path, serve, scans, ranges, monkeypatch, caplog):
    www, url = serve
    monkeypatch.setattr(FolderHandler, "ranges", ranges)
    write_corpus(tmp_path)
    make_archive(tmp_path, "dev-clean", www / "dev-clean.tar.gz")
    path = tmp_path / "m.json"
    source = ArchiveSource(str(tmp_path), url)
    manifest = load_manifest(source, f"{url}/dev-clean.tar.gz", path)
    assert {u.id: u.transcript for u in manifest.utterances if u.id in USABLE} == USABLE
    # Random access over HTTP needs byte ranges; without them training shards each read the whole archive.
    assert (manifest.index_file is not None) == ranges == (path.with_suffix(".gzidx").is_file())
    assert ("does not serve byte ranges" in caplog.text) != ranges
    load_manifest(source, f"{url}/dev-clean.tar.gz", path)
    assert len(scans) == 1
    (www / "dev-clean.tar.gz").write_bytes((www / "dev-clean.tar.gz").read_bytes() + b"\0" * 1024)
    os.utime(www / "dev-clean.tar.gz", (1e9, 1e9))
    load_manifest(source, f"{url}/dev-clean.tar.gz", path)
    assert len(scans) == 2
