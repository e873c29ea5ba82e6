"""A small synthetic speech corpus, spoken by eSpeak NG and written in the LibriSpeech layout.

The corpus is the offline stand-in for LibriSpeech: random word sequences over a fixed vocabulary, spoken by
several eSpeak voices at random rate and pitch, with light noise, as 16 kHz FLAC with ``*.trans.txt`` files.
Besides the test set of the training voices (``test-seen``) and of held-out voices (``test-unseen``), three test sets
lie outside the training conditions: faster speech (``test-fast``), more noise (``test-noisy``) and English accents
and voices never used in training (``test-accents``). Everything is drawn from one seed, so the same seed always
gives the same corpus.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import logging
import multiprocessing
import random
import shutil
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import soundfile as sf

from asr.data.librispeech import SAMPLE_RATE

log = logging.getLogger(__name__)

_ESPEAK_RATE = 22_050
# espeak_PARAMETER values from speak_lib.h
_RATE, _PITCH, _WORDGAP = 1, 3, 7
_AUDIO_OUTPUT_SYNCHRONOUS, _POS_CHARACTER, _CHARS_UTF8 = 2, 1, 1


@dataclass(frozen=True)
class DemoCorpusConfig:
    seed: int = 1234
    train_hours: float = 1.0
    dev_utterances: int = 200
    test_utterances: int = 300
    min_words: int = 2
    max_words: int = 8
    # (eSpeak language, voice variant): each pair is one speaker.
    train_voices: tuple[str, ...] = (
        "en-us+m1",
        "en-us+f2",
        "en+m3",
        "en+f4",
        "en-gb-scotland+m2",
        "en-029+f1",
        "en-us-nyc+m7",
        "en-gb-x-rp+f3",
    )
    heldout_voices: tuple[str, ...] = ("en-us+m4", "en-gb-x-rp+f5")
    # Lancaster and West Midlands English, which no other split speaks, with voice variants train does not use.
    accent_voices: tuple[str, ...] = (
        "en-gb-x-gbclan+m5",
        "en-gb-x-gbcwmd+linda",
        "en-gb-x-gbclan+steph",
        "en-gb-x-gbcwmd+m6",
    )
    words_per_minute: tuple[int, int] = (170, 220)
    fast_words_per_minute: tuple[int, int] = (240, 280)  # test-fast
    pitch: tuple[int, int] = (30, 70)
    word_gap_10ms: int = 2
    snr_db: tuple[float, float] = (15.0, 35.0)
    noisy_snr_db: tuple[float, float] = (6.0, 12.0)  # test-noisy
    splits: tuple[str, ...] = field(
        default=("train", "dev", "test-seen", "test-unseen", "test-fast", "test-noisy", "test-accents"), init=False
    )
    # Bump when the synthesis code changes, so cached corpora are rebuilt.
    version: int = 2

    def fingerprint(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


def vocabulary() -> list[str]:
    return resources.files("asr.data").joinpath("words.txt").read_text().split()


@dataclass(frozen=True)
class _Utterance:
    path: str
    text: str
    voice: str
    wpm: int
    pitch: int
    snr_db: float
    noise_seed: int


@dataclass(frozen=True)
class _Conditions:
    count: int
    voices: tuple[str, ...]
    words_per_minute: tuple[int, int]
    snr_db: tuple[float, float]


def _conditions(cfg: DemoCorpusConfig) -> dict[str, _Conditions]:
    """Each split's size, voices, speaking rates and noise, in the order their sentences are drawn: the splits of
    version 1 first, so that they stay as they were."""
    mean_seconds = 0.3 * (cfg.min_words + cfg.max_words) / 2 + 0.25  # measured for the default voices and rates
    train_hours = cfg.train_hours * 3600
    test, voices, wpm, snr = cfg.test_utterances, cfg.train_voices, cfg.words_per_minute, cfg.snr_db
    return {
        "dev": _Conditions(cfg.dev_utterances, voices, wpm, snr),
        "test-seen": _Conditions(test, voices, wpm, snr),
        "test-unseen": _Conditions(test, cfg.heldout_voices, wpm, snr),
        "train": _Conditions(int(train_hours / mean_seconds), voices, wpm, snr),
        "test-fast": _Conditions(test, voices, cfg.fast_words_per_minute, snr),
        "test-noisy": _Conditions(test, voices, wpm, cfg.noisy_snr_db),
        "test-accents": _Conditions(test, cfg.accent_voices, wpm, snr),
    }


def _plan(cfg: DemoCorpusConfig, root: Path) -> dict[str, list[_Utterance]]:
    """Draw every sentence and synthesis setting up front, so the result does not depend on worker order."""
    rng = random.Random(cfg.seed)
    words = vocabulary()
    all_voices = cfg.train_voices + cfg.heldout_voices + cfg.accent_voices
    seen: set[str] = set()

    def sentence() -> str:
        while True:
            text = " ".join(rng.choice(words) for _ in range(rng.randint(cfg.min_words, cfg.max_words))).upper()
            if text not in seen:
                seen.add(text)
                return text

    plan: dict[str, list[_Utterance]] = {}
    # Sentences are never repeated across splits because `seen` is shared.
    for split, conditions in _conditions(cfg).items():
        voices = conditions.voices
        utterances = []
        for k in range(conditions.count):
            speaker_index = k % len(voices)
            speaker = 100 * (1 + speaker_index) + all_voices.index(voices[speaker_index])
            chapter = 1 + cfg.splits.index(split)
            utt_id = f"{speaker}-{chapter}-{k // len(voices):04d}"
            utterances.append(
                _Utterance(
                    path=str(root / split / str(speaker) / str(chapter) / f"{utt_id}.flac"),
                    text=sentence(),
                    voice=voices[speaker_index],
                    wpm=rng.randint(*conditions.words_per_minute),
                    pitch=rng.randint(*cfg.pitch),
                    snr_db=rng.uniform(*conditions.snr_db),
                    noise_seed=rng.randrange(2**31),
                )
            )
        plan[split] = utterances
    return plan


class _Espeak:
    """Minimal ctypes binding to the libespeak-ng that the espeakng-loader wheel ships."""

    _CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

    def __init__(self) -> None:
        import espeakng_loader

        self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
        data = espeakng_loader.get_data_path().encode()
        if self._lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data, 0) != _ESPEAK_RATE:
            raise RuntimeError(f"eSpeak NG failed to initialise with data at {data.decode()}")
        self._chunks: list[np.ndarray] = []
        self._callback = self._CALLBACK(self._collect)  # keep a reference: ctypes does not
        self._lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, n: int, _events) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0

    def speak(self, text: str, voice: str, wpm: int, pitch: int, word_gap_10ms: int, seed: int) -> np.ndarray:
        """The waveform at 22,050 Hz. Besides the seed of its random draws (the breath noise of some voices, else
        seeded from the clock), it depends on what this process spoke before (the phase of the pitch flutter)."""
        if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"eSpeak NG has no voice {voice!r}")
        self._lib.espeak_ng_SetRandSeed(ctypes.c_long(seed))
        for parameter, value in ((_RATE, wpm), (_PITCH, pitch), (_WORDGAP, word_gap_10ms)):
            self._lib.espeak_SetParameter(parameter, value, 0)
        self._chunks.clear()
        data = text.lower().encode()
        self._lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        self._lib.espeak_Synchronize()
        return np.concatenate(self._chunks).astype(np.float32) / 32768.0


def _synthesize(batch: tuple[list[_Utterance], int]) -> None:
    import torch
    from torchaudio.transforms import Resample

    utterances, word_gap = batch
    torch.set_num_threads(1)
    espeak = _Espeak()
    resample = Resample(_ESPEAK_RATE, SAMPLE_RATE)  # its filter is built once, not per call
    for utt in utterances:
        wave = espeak.speak(utt.text, utt.voice, utt.wpm, utt.pitch, word_gap, utt.noise_seed)
        wave = resample(torch.from_numpy(wave)).numpy()
        rng = np.random.default_rng(utt.noise_seed)
        wave = np.concatenate(
            [np.zeros(rng.integers(800, 2400), np.float32), wave, np.zeros(rng.integers(800, 2400), np.float32)]
        )
        power = float(np.mean(wave**2)) + 1e-10
        wave = wave + rng.standard_normal(wave.shape).astype(np.float32) * np.sqrt(power / 10 ** (utt.snr_db / 10))
        wave = 0.9 * wave / max(1e-6, float(np.abs(wave).max()))
        Path(utt.path).parent.mkdir(parents=True, exist_ok=True)
        sf.write(utt.path, wave, SAMPLE_RATE, format="FLAC", subtype="PCM_16")


def build_demo_corpus(root: str | Path, cfg: DemoCorpusConfig = DemoCorpusConfig(), workers: int = 2) -> Path:
    """Synthesise the corpus under ``root/LibriSpeech`` once; later calls return the cached tree."""
    tree = Path(root).expanduser() / "LibriSpeech"
    marker = tree / f".demo-{cfg.fingerprint()}"
    if marker.exists():
        return tree
    tree.parent.mkdir(parents=True, exist_ok=True)
    with open(tree.parent / ".LibriSpeech.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # runs sharing the cache build it once; the others wait for it
        if not marker.exists():
            _build(tree, marker, cfg, workers)
    return tree


def _build(tree: Path, marker: Path, cfg: DemoCorpusConfig, workers: int) -> None:
    if tree.exists():
        if not any(tree.glob(".demo-*")):
            raise FileExistsError(f"{tree} exists and is not a demo corpus; point data.root at another folder")
        log.info("Removing the demo corpus at %s, built with other settings", tree)
        shutil.rmtree(tree)
    log.info("Synthesising the demo corpus into %s (once; it is cached)", tree)
    # Built beside the tree and renamed to it once complete: an interrupted build leaves no tree behind.
    staging = tree.with_name(".LibriSpeech.building")
    shutil.rmtree(staging, ignore_errors=True)
    plan = _plan(cfg, staging)
    # One job per worker: libespeak-ng keeps global state and must be initialised once per process.
    everything = [utt for utts in plan.values() for utt in utts]
    jobs = [(everything[i::workers], cfg.word_gap_10ms) for i in range(workers)]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.map(_synthesize, jobs)
    for utts in plan.values():
        transcripts: dict[Path, list[str]] = {}
        for utt in utts:
            path = Path(utt.path)
            key = path.parent / f"{path.stem.rsplit('-', 1)[0]}.trans.txt"
            transcripts.setdefault(key, []).append(f"{path.stem} {utt.text}")
        for key, lines in transcripts.items():
            key.write_text("\n".join(sorted(lines)) + "\n")
    (staging / marker.name).write_text(json.dumps(asdict(cfg), indent=1))
    staging.rename(tree)


if __name__ == "__main__":
    import sys
    import time

    logging.basicConfig(level=logging.INFO)
    start = time.time()
    print(build_demo_corpus(sys.argv[1]), f"{time.time() - start:.1f}s")
