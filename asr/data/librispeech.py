"""Reading the LibriSpeech directory layout: ``<root>/LibriSpeech/<split>/<speaker>/<chapter>/*.flac``."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000  # LibriSpeech, and what the pretrained encoders expect


@dataclass(frozen=True)
class Utterance:
    id: str
    path: str
    transcript: str
    speaker: str
    duration: float
    sample_rate: int


class DataError(ValueError):
    """An input file is unusable; the message names the file and the problem."""


def split_dir(root: str | Path, split: str) -> Path:
    return Path(root).expanduser() / "LibriSpeech" / split


def read_split(root: str | Path, split: str, on_error: str = "skip") -> tuple[list[Utterance], Counter]:
    """All utterances of one split, sorted by id, and the count of skipped items by reason.

    With ``on_error="raise"`` the first problem raises a :class:`DataError` instead of being counted.
    """
    directory = split_dir(root, split)
    if not directory.is_dir():
        raise FileNotFoundError(f"LibriSpeech split {split!r} not found: {directory} is not a directory")
    skipped: Counter = Counter()

    def problem(reason: str, path: Path, detail: str) -> None:
        if on_error == "raise":
            raise DataError(f"{path}: {detail}")
        skipped[reason] += 1
        log.warning("skipping %s: %s", path, detail)

    utterances = []
    for trans_file in sorted(directory.glob("*/*/*.trans.txt")):
        transcripts = {}
        for line_no, line in enumerate(trans_file.read_text().splitlines(), start=1):
            utt_id, _, text = line.strip().partition(" ")
            if not utt_id:
                continue
            if not text.strip():
                problem("empty transcript", trans_file, f"line {line_no} has no transcript for {utt_id}")
                continue
            transcripts[utt_id] = text.strip()
        audio = {p.stem: p for p in trans_file.parent.glob("*.flac")}
        for utt_id in sorted(audio.keys() - transcripts.keys()):
            problem("audio without transcript", audio[utt_id], f"no line for {utt_id} in {trans_file.name}")
        for utt_id in sorted(transcripts.keys() - audio.keys()):
            problem("transcript without audio", trans_file, f"{utt_id}.flac is missing")
        for utt_id in sorted(transcripts.keys() & audio.keys()):
            path = audio[utt_id]
            try:
                info = sf.info(str(path))
            except (sf.LibsndfileError, RuntimeError) as err:
                problem("unreadable audio", path, f"cannot read audio header ({err})")
                continue
            speaker = utt_id.split("-", 1)[0]
            utterances.append(Utterance(utt_id, str(path), transcripts[utt_id], speaker, info.duration, info.samplerate))
    if not utterances:
        raise DataError(f"{directory}: no utterances found (expected <speaker>/<chapter>/*.flac with *.trans.txt)")
    if skipped:
        log.warning("%s: skipped %d items: %s", directory, sum(skipped.values()), dict(skipped))
    return utterances, skipped
