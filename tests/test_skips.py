"""The skip log: each unusable utterance counted once, under the split that holds it; decoding skips logged once
per stage and epoch."""

import logging

from asr.data.librispeech import Problem
from asr.data.skips import SkipLog

LOCATIONS = {"dev-clean": ["/d/LibriSpeech/dev-clean"], "train-960": ["/d/a.tar.gz", "/d/b.tar.gz"]}


def test_an_utterance_is_counted_once_under_its_split_however_often_it_is_met(caplog):
    skips = SkipLog(LOCATIONS.__getitem__)
    skips.add("dev-clean", [Problem("empty transcript", "/d/LibriSpeech/dev-clean/1/2/1-2-3.flac", "")])
    caplog.set_level(logging.WARNING)
    for epoch in range(2):
        skips.decoded("train", epoch, ["train-960", "dev-clean"], [("undecodable audio", "/d/b.tar.gz:x.flac")])
        skips.decoded("validate", epoch, ["dev-clean"], [("undecodable audio", "/d/LibriSpeech/dev-clean/5.flac")])
        skips.decoded("validate", epoch, ["dev-clean"], [])
    skips.flush()
    assert skips.counts == {
        "dev-clean/empty transcript": 1,
        "train-960/undecodable audio": 1,
        "dev-clean/undecodable audio": 1,
    }
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 4 and logged[0].startswith("train, epoch 0: skipped 1 utterances while decoding")
    assert "validate, epoch 1" in logged[3] and "e.g. undecodable audio: /d/LibriSpeech/dev-clean/5.flac" in logged[3]
    skips.flush()
    assert len(caplog.records) == 4  # nothing new to log
