import pytest

from asr.data.librispeech import DataError, read_split
from tests.conftest import write_flac


def make_tree(root):
    split = root / "LibriSpeech" / "dev-clean"
    write_flac(split / "84" / "121123" / "84-121123-0000.flac", 1.0)
    write_flac(split / "84" / "121123" / "84-121123-0001.flac", 2.5)
    write_flac(split / "84" / "121123" / "84-121123-0002.flac", 0.5)  # no transcript line
    (split / "84" / "121123" / "84-121123.trans.txt").write_text(
        "84-121123-0000 GO DO YOU HEAR\n84-121123-0001 BUT IN LESS THAN FIVE MINUTES\n84-121123-0009 MISSING AUDIO\n"
    )
    write_flac(split / "174" / "50561" / "174-50561-0000.flac", 1.5)
    (split / "174" / "50561" / "174-50561-0001.flac").write_bytes(b"fLaC not really")
    (split / "174" / "50561" / "174-50561.trans.txt").write_text(
        "174-50561-0000 FORGOTTEN TOO THE NAME OF GILLIAN\n174-50561-0001 A CORRUPT FILE\n"
    )
    return split


def test_reads_utterances_and_counts_every_problem(tmp_path):
    make_tree(tmp_path)
    utterances, skipped = read_split(tmp_path, "dev-clean")
    assert [u.id for u in utterances] == ["174-50561-0000", "84-121123-0000", "84-121123-0001"]
    first = utterances[1]
    assert first.transcript == "GO DO YOU HEAR"
    assert first.speaker == "84"
    assert first.duration == pytest.approx(1.0)
    assert first.sample_rate == 16_000
    assert skipped == {"audio without transcript": 1, "transcript without audio": 1, "unreadable audio": 1}


def test_raise_policy_names_the_file(tmp_path):
    make_tree(tmp_path)
    with pytest.raises(DataError, match=r"174-50561-0001\.flac: cannot read audio header"):
        read_split(tmp_path, "dev-clean", on_error="raise")


def test_missing_split_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="test-other"):
        read_split(tmp_path, "test-other")
