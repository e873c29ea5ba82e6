"""Sources: where each reads a part, what it says when data is missing, how inspect says a part is read; and a
source added by config alone."""

import io
from pathlib import Path

import numpy as np
import soundfile as sf

from asr.builders import build_datamodule
from asr.config import compose
from asr.data.librispeech import Utterance
from asr.data.manifest import Manifest
from asr.data.sources import Source
from asr.data.sources.archive import ArchiveSource
from asr.data.sources.demo import DemoSource
from asr.data.sources.folder import FolderSource
from tests.helpers import drain, ready


def test_each_source_says_where_a_part_is(tmp_path):
    assert FolderSource(str(tmp_path)).locations("dev-clean") == [str(tmp_path / "LibriSpeech" / "dev-clean")]
    assert ArchiveSource(str(tmp_path)).locations("train-960") == [
        str(tmp_path / f"{part}.tar.gz") for part in ("train-clean-100", "train-clean-360", "train-other-500")
    ]
    url = ArchiveSource(str(tmp_path), "https://example.org/12/").location("test-other")
    assert url == "https://example.org/12/test-other.tar.gz"


def test_a_missing_folder_says_how_to_get_it_and_an_archive_in_its_place_how_to_read_it(tmp_path):
    folder = FolderSource(str(tmp_path))
    message = folder.missing(["dev-clean", "test-other"])
    assert message.startswith(f"LibriSpeech is missing at data.root={tmp_path}: no dev-clean, test-other")
    assert "python -m asr.data download" in message and "data/source=archive" in message
    (tmp_path / "test-other.tar.gz").write_bytes(b"")
    (tmp_path / "LibriSpeech" / "dev-clean").mkdir(parents=True)
    assert folder.missing(["dev-clean", "test-other"]) == (
        f"LibriSpeech test-other is not extracted in {tmp_path / 'LibriSpeech'}, but {tmp_path / 'test-other.tar.gz'} "
        f"exists: read the archives as they are with data/source=archive, or extract them with "
        f"`python -m asr.data download data.root={tmp_path}`."
    )
    (tmp_path / "LibriSpeech" / "test-other").mkdir()
    assert folder.missing(["dev-clean", "test-other"]) is None


def test_missing_archives_are_named_and_urls_and_the_demo_are_not_checked(tmp_path):
    message = ArchiveSource(str(tmp_path)).missing(["dev-clean"])
    assert f"no {tmp_path / 'dev-clean.tar.gz'}" in message and "data.source.url=" in message
    (tmp_path / "dev-clean.tar.gz").write_bytes(b"")
    assert ArchiveSource(str(tmp_path)).missing(["dev-clean"]) is None
    assert ArchiveSource(str(tmp_path), "http://host/12").missing(["test-other"]) is None  # no network access
    assert DemoSource(str(tmp_path / "nowhere")).missing(["train"]) is None  # synthesised on first use


def test_inspect_says_how_each_part_is_read():
    assert FolderSource("/data").reading(Manifest("/data/LibriSpeech/dev-clean", "", [], [])) == "at random"
    archive = ArchiveSource("/data")
    assert archive.reading(Manifest("/data/dev-clean.tar.gz", "", [], [], "/m/dev-clean.gzidx")).startswith("in parts")
    assert "serves no byte ranges" in archive.reading(Manifest("http://host/dev-clean.tar.gz", "", [], []))


class ToneSource(Source):
    """A source made up here: ``count`` tones per part, named after their pitch, synthesised when opened."""

    def __init__(self, count: int = 6) -> None:
        self.count = count

    def location(self, part: str) -> str:
        return f"tones://{part}"

    def fingerprint(self, location: str) -> str:
        return str(self.count)

    def scan(self, location: str, index_to: Path) -> Manifest:
        utterances = [
            Utterance(f"1-1-{k}", location, "A TONE", "1", 8000 + 1000 * k, 16_000, member=str(k), index=k)
            for k in range(self.count)
        ]
        return Manifest(location, "", utterances, [])

    def open(self, utt: Utterance) -> io.BytesIO:
        wave = 0.3 * np.sin(np.arange(utt.num_samples) * 2 * np.pi * (200 + 50 * utt.index) / utt.sample_rate)
        audio = io.BytesIO()
        sf.write(audio, wave, utt.sample_rate, format="FLAC")
        audio.seek(0)
        return audio

    def missing(self, splits: list[str]) -> str | None:
        return None


def test_a_source_defined_outside_the_package_is_chosen_by_config(tmp_path):
    cfg = compose(
        "train",
        [
            "experiment=demo",
            f"data.root={tmp_path}",
            "~data.source",
            "+data.source._target_=tests.test_sources.ToneSource",
            "+data.source.count=5",
            "data.train_splits=[train]",
            "data.val_splits=[dev]",
            "data.test_splits=[]",
        ],
    )
    dm = ready(build_datamodule(cfg))
    assert isinstance(dm.source, ToneSource)
    batches = drain(dm, dm.train_dataloader())
    assert sorted(i for b in batches for i in b["ids"]) == [f"1-1-{k}" for k in range(5)]
    assert all(text == "A TONE" for b in batches for text in b["texts"])
    assert sorted(int(n) for b in batches for n in b["lengths"]) == [8000 + 1000 * k for k in range(5)]
    assert [i for b in drain(dm, dm.val_dataloader()[0]) for i in b["ids"]] == [f"1-1-{k}" for k in range(5)]
    assert sorted(p.name for p in (tmp_path / "manifests").iterdir()) == ["dev.json", "train.json"]
