"""The skip log: each unusable utterance counted once, under the split that holds it, and named: in the log (the
first few per reason) and in its list file."""

import csv
import logging

from asr.data.librispeech import Problem
from asr.data.skips import SkipLog, describe

LOCATIONS = {"dev-clean": ["/d/LibriSpeech/dev-clean"], "train-960": ["/d/a.tar.gz", "/d/b.tar.gz"]}


def test_an_utterance_is_counted_once_under_its_split_however_often_it_is_met(caplog, tmp_path):
    skips = SkipLog(LOCATIONS.__getitem__, tmp_path / "skipped.tsv")
    caplog.set_level(logging.WARNING)
    skips.add("dev-clean", [Problem("empty transcript", "/d/LibriSpeech/dev-clean/1/2/1-2-3.flac", "no text")], 7, "x")
    for epoch in range(2):
        skips.decoded(
            "train", epoch, ["train-960", "dev-clean"], [Problem("undecodable audio", "/d/b.tar.gz:x.flac", "")]
        )
        skips.decoded(
            "validate", epoch, ["dev-clean"], [Problem("undecodable audio", "/d/LibriSpeech/dev-clean/5.flac", "")]
        )
        skips.decoded("validate", epoch, ["dev-clean"], [])
    skips.flush()
    assert skips.counts == {
        "dev-clean/empty transcript": 1,
        "train-960/undecodable audio": 1,
        "dev-clean/undecodable audio": 1,
    }
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 5
    assert logged[0].startswith(f"dev-clean: 7 utterances for x; skipped 1 (all 1 listed in {tmp_path}/skipped.tsv)")
    assert "  empty transcript: 1\n    /d/LibriSpeech/dev-clean/1/2/1-2-3.flac (no text)" in logged[0]
    assert logged[1].startswith("train, epoch 0: skipped 1 utterances while decoding (all 2 listed in")
    assert "validate, epoch 1" in logged[4] and "undecodable audio: 1\n    /d/LibriSpeech/dev-clean/5.flac" in logged[4]
    skips.flush()
    assert len(caplog.records) == 5  # nothing new to log
    with open(tmp_path / "skipped.tsv", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows == [
        ["split", "reason", "id", "where", "detail"],
        ["dev-clean", "empty transcript", "1-2-3", "/d/LibriSpeech/dev-clean/1/2/1-2-3.flac", "no text"],
        ["train-960", "undecodable audio", "x", "/d/b.tar.gz:x.flac", ""],
        ["dev-clean", "undecodable audio", "5", "/d/LibriSpeech/dev-clean/5.flac", ""],
    ]


def test_the_log_names_the_first_few_of_each_reason_and_counts_the_rest():
    problems = [Problem("empty transcript", f"/d/{k}.flac", "") for k in range(5)] + [Problem("b", "/d/x.flac", "why")]
    assert describe(problems, examples=2) == (
        "  empty transcript: 5\n    /d/0.flac\n    /d/1.flac\n    ... and 3 more\n  b: 1\n    /d/x.flac (why)"
    )
