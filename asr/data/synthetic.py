"""Synthetic LibriSpeech-like durations and long files, for benchmarks and tests of batching and loading."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import soundfile as sf

from asr.data.librispeech import SAMPLE_RATE, Utterance


def train_clean_100_durations(n: int, rng: np.random.Generator) -> np.ndarray:
    """Durations (s) imitating LibriSpeech train-clean-100 (mean 12.7 s, most within 10-16.5 s, 1.3-24.5 s):
    80% normal(13.55, 1.6) clipped to [10, 16.5], 15% uniform(1.3, 10), 5% uniform(16.5, 24.5)."""
    kind = rng.random(n)
    main = np.clip(rng.normal(13.55, 1.6, n), 10.0, 16.5)
    short = rng.uniform(1.3, 10.0, n)
    long = rng.uniform(16.5, 24.5, n)
    return np.where(kind < 0.80, main, np.where(kind < 0.95, short, long))


def librispeech_like_durations(hours: float, seed: int = 0) -> list[float]:
    """About ``hours`` of train-clean-100-like durations."""
    durations = train_clean_100_durations(int(hours * 3600 / 12.7) + 1, np.random.default_rng(seed))
    return durations.tolist()


def write_long_files(utterances: list[Utterance], root: Path, files: int, seed: int = 0) -> Path:
    """``files`` FLAC files of train-clean-100-like durations under ``root/LibriSpeech/train-clean-100``, each
    made of consecutive ``utterances`` (speech compresses, and decodes, unlike noise) and their transcripts."""
    rng = np.random.default_rng(seed)
    source = itertools.cycle(utterances)
    chapter = root / "LibriSpeech" / "train-clean-100" / "1" / "1"
    chapter.mkdir(parents=True)
    lines = []
    for k, duration in enumerate(train_clean_100_durations(files, rng)):
        pieces, words, samples = [], [], 0
        while samples < duration * SAMPLE_RATE:
            utt = next(source)
            pieces.append(sf.read(utt.path, dtype="int16")[0])
            words.append(utt.transcript)
            samples += len(pieces[-1])
        sf.write(chapter / f"1-1-{k:04d}.flac", np.concatenate(pieces), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        lines.append(f"1-1-{k:04d} {' '.join(words)}")
    (chapter / "1-1.trans.txt").write_text("\n".join(lines) + "\n")
    return root
