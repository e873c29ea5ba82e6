"""What makes an utterance usable, and decoding usable ones into padded 16-bit PCM batches."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from asr.data.librispeech import SAMPLE_RATE, DataError, Problem, Utterance
from asr.data.text import CharTokenizer, canonical, normalize
from asr.data.transfer import pcm_buffer


def to_pcm16(audio: np.ndarray) -> np.ndarray:
    """Float audio in [-1, 1) as 16-bit PCM, rounded and clipped: what every decoded batch holds."""
    return np.clip(np.round(audio * 32768), -32768, 32767).astype(np.int16)


@dataclass(frozen=True)
class Checks:
    """What makes an utterance usable: its manifest entry (header and transcript), then its decoding."""

    tokenizer: CharTokenizer
    sample_rate: int = SAMPLE_RATE
    resample: bool = False
    # The encoder's receptive field and frame rate (HuBERT/wav2vec 2.0 CNN: 400 samples, a frame per 320).
    min_samples: int = 400
    frames_per_second: float = 50.0
    min_duration: float | None = None
    max_duration: float | None = None
    max_batch_seconds: float | None = None  # training batches' budget: a longer utterance fits in none
    max_speed: float = 1.0  # the fastest speed perturbation of training (asr.data.augment): fewer CTC frames

    def problem(self, utt: Utterance, for_training: bool) -> Problem | None:
        """Why ``utt`` cannot be used, or None. Duration limits and the CTC length check apply to training
        only: evaluation keeps every utterance the model can encode, so its WER is over the whole split."""

        def bad(reason: str, detail: str) -> Problem:
            return Problem(reason, utt.where, detail)

        # Checked before normalisation, which would strip such characters from the label silently.
        unknown = self.tokenizer.unknown_characters(canonical(utt.transcript))
        if unknown:
            return bad("characters outside the vocabulary", "".join(sorted(unknown)))
        if utt.sample_rate != self.sample_rate and not self.resample:
            expected = f"expected {self.sample_rate} Hz (data.resample=true resamples)"
            return bad("wrong sample rate", f"{utt.sample_rate} Hz, {expected}")
        samples = round(utt.duration * self.sample_rate)
        if samples < self.min_samples:
            return bad("shorter than the receptive field", f"{samples} < {self.min_samples} samples")
        if not for_training:
            return None
        if self.min_duration is not None and utt.duration < self.min_duration:
            return bad("shorter than data.min_duration", f"{utt.duration:.2f} s")
        if self.max_duration is not None and utt.duration > self.max_duration:
            return bad("longer than data.max_duration", f"{utt.duration:.2f} s")
        if self.max_batch_seconds is not None and utt.duration > self.max_batch_seconds:
            return bad("longer than data.max_batch_seconds", f"{utt.duration:.2f} s")
        # CTC needs a frame per label, and a blank between repeated labels; fewer give an infinite loss.
        text = normalize(utt.transcript)
        needed = len(text) + sum(a == b for a, b in itertools.pairwise(text))
        frames = (samples / self.max_speed - self.min_samples) * self.frames_per_second // self.sample_rate + 1
        if frames < needed:
            return bad(
                "label longer than the output frames",
                f"{needed} CTC frames needed, {frames:.0f} in {utt.duration:.2f} s"
                + (f" at speed {self.max_speed:g}" if self.max_speed != 1 else ""),
            )
        return None

    def samples(self, utt: Utterance) -> int:
        """How many samples ``utt`` decodes to, at ``sample_rate``: its row in a padded batch."""
        if utt.sample_rate == self.sample_rate:
            return utt.num_samples
        return math.ceil(utt.num_samples * self.sample_rate / utt.sample_rate)  # as torchaudio resamples

    def decode(self, utt: Utterance, source: str | BinaryIO, out: np.ndarray | None = None) -> np.ndarray:
        """Mono 16-bit PCM at ``sample_rate``, ``samples(utt)`` long, or a :class:`DataError`. Written into
        ``out`` when given; mono audio at ``sample_rate`` (all of LibriSpeech) is decoded straight into it."""
        try:
            with sf.SoundFile(source) as f:
                direct = f.channels == 1 and f.samplerate == self.sample_rate
                if direct:
                    audio = f.read(dtype="int16") if out is None else f.read(out=out)
                else:
                    audio, rate = f.read(dtype="float32"), f.samplerate
        except (sf.LibsndfileError, RuntimeError) as err:
            raise DataError.of(Problem("undecodable audio", utt.where, str(err))) from err
        if not direct:
            if audio.ndim == 2:
                audio = audio.mean(axis=1)
            if rate != self.sample_rate:  # problem() let it through: data.resample is on
                audio = AF.resample(torch.from_numpy(audio), rate, self.sample_rate).numpy()
            audio = to_pcm16(audio)
        if len(audio) < self.samples(utt):
            detail = f"{len(audio)} of {self.samples(utt)} samples"
            raise DataError.of(Problem("truncated audio", utt.where, detail))
        if out is None or direct:
            return audio
        out[:] = audio[: len(out)]
        return out

    def batch(
        self,
        records: Sequence[tuple[Utterance, str | BinaryIO]],
        on_error: str,
        skipped: Sequence[Problem] = (),
        buffer: Callable[[Sequence[int]], torch.Tensor] = pcm_buffer,
    ) -> dict:
        """Decode utterances into one zero-padded 16-bit PCM ``buffer`` (made for their lengths): a loader batch,
        with ``lengths``, ``labels`` (token ids), ``texts``, ``ids`` and ``skipped`` as lists. Under
        ``on_error="skip"`` the utterances that fail are left out and their problems listed in ``skipped``,
        after the given ``skipped``. :func:`model_inputs` makes the model's inputs from it."""
        lengths = [self.samples(utt) for utt, _ in records]
        pcm = buffer(lengths)
        rows, failed = pcm.numpy(), []
        for k, ((utt, source), n) in enumerate(zip(records, lengths, strict=True)):
            try:
                self.decode(utt, source, out=rows[k, :n])
            except DataError as err:
                if on_error == "raise":
                    raise
                failed.append(k)
                skipped = [*skipped, err.problem or Problem(err.reason, utt.where, str(err))]
        if failed:  # rare: a copy of the buffer without them
            keep = [k for k in range(len(records)) if k not in failed]
            records, lengths = [records[k] for k in keep], [lengths[k] for k in keep]
            pcm = pcm[keep, : max(lengths, default=0)]
        texts = [normalize(utt.transcript) for utt, _ in records]
        return {
            "input_values": pcm,
            "lengths": lengths,
            "labels": [self.tokenizer.encode(t) for t in texts],
            "texts": texts,
            "ids": [utt.id for utt, _ in records],
            "skipped": list(skipped),
        }
