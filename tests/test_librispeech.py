"""The folder reader, problems and the policy for them, and split names."""

from collections import Counter
from pathlib import Path

import pytest

from asr.data.librispeech import DataError, apply_policy, parts, scan_directory
from tests.helpers import CHECK_PROBLEMS, SOURCE_PROBLEMS, USABLE, key, write_corpus


def test_scan_finds_every_utterance_and_problem(tmp_path):
    utterances, problems = scan_directory(write_corpus(tmp_path))
    expected_ids = sorted([*USABLE, *CHECK_PROBLEMS])
    assert [u.id for u in utterances] == expected_ids
    assert {u.id: u.transcript for u in utterances if u.id in USABLE} == USABLE
    first = next(u for u in utterances if u.id == "84-121123-0000")
    assert (first.speaker, first.duration, first.sample_rate, first.num_samples) == ("84", 1.0, 16000, 16000)
    assert {key(p): p.reason for p in problems} == SOURCE_PROBLEMS
    assert all(Path(p.where.partition(":")[0]).exists() or "*" in p.where for p in problems)  # a file, or its line


def test_policy_raises_with_the_file_or_counts(tmp_path):
    _, problems = scan_directory(write_corpus(tmp_path))
    assert apply_policy(problems, "skip") == problems
    assert Counter(p.reason for p in problems) == {
        "audio without transcript": 2,
        "empty transcript": 1,
        "transcript without audio": 1,
        "unreadable audio": 1,
    }
    with pytest.raises(DataError, match=r"2-3-0000\.flac: audio without transcript \(no line for 2-3-0000 "):
        apply_policy(problems, "raise")


def test_split_names():
    assert parts("train-960") == ("train-clean-100", "train-clean-360", "train-other-500")
    assert parts("dev-clean") == ("dev-clean",)
