"""Waveform augmentation of training batches, on the batch's device after the transfer, before the model inputs are
made (:func:`asr.data.dataset.model_inputs` normalises each utterance afterwards): speed perturbation, reverberation
with room impulse responses, additive noise. Whole batches at a time; their random draws come from generators
seeded by the batch's place in training (:meth:`Augmentation.__call__`), never from the global ones.

A batch here is audio at the scale of 16-bit PCM, as float32 (batch, width) zero beyond each utterance's length;
transforms return the same with new lengths. SpecAugment is the model's (``augment.specaugment``: docs/augmentation.md).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from asr.data.librispeech import DataError, Problem, apply_policy
from asr.data.skips import describe

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".flac", ".wav")


@dataclass
class Draws:
    """A transform's random draws for one batch: small ones (choices, SNRs, offsets) on the host, bulk ones (white
    noise) on the batch's device."""

    host: torch.Generator
    device: torch.Generator


def valid(lengths: Sequence[int], width: int, device: torch.device) -> torch.Tensor:
    """(batch, width) float mask of the samples within each utterance's length."""
    lengths = torch.tensor(list(lengths), dtype=torch.long).to(device, non_blocking=True)
    return (torch.arange(width, device=device)[None, :] < lengths[:, None]).float()


def uniform(low: float, high: float, n: int, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def chosen(p: float, n: int, generator: torch.Generator) -> torch.Tensor:
    """Which of ``n`` utterances a transform of probability ``p`` applies to (bool, host)."""
    return torch.rand(n, generator=generator) < p


def _check_probability(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"augment.{name}.p must be in [0, 1], not {p}")


def _check_range(name: str, values: Sequence[float]) -> tuple[float, float]:
    if len(values) != 2 or values[0] > values[1]:
        raise ValueError(f"augment.{name} must be [low, high] with low <= high, not {list(values)}")
    return float(values[0]), float(values[1])


class SpeedPerturbation:
    """Each utterance played faster or slower by a factor drawn for it, as Kaldi's and lhotse's speed perturbation
    (resampling: tempo and pitch change together; ``torchaudio.functional.resample``). The factors are ``factors``,
    or every ``step`` in ``range`` (both inclusive), drawn uniformly; each is rounded to hundredths, so resampling is
    by a ratio of small integers. An utterance of n samples becomes ceil(n / factor) long."""

    def __init__(
        self, factors: Sequence[float] | None = None, range: Sequence[float] | None = None, step: float = 0.01
    ) -> None:
        if (factors is None) == (range is None):
            raise ValueError("augment.speed: set exactly one of factors and range")
        if range is not None:
            low, high = _check_range("speed.range", range)
            if step <= 0:
                raise ValueError(f"augment.speed.step must be positive, not {step}")
            factors = np.arange(low, high + step / 2, step)
        ratios = sorted({Fraction(round(100 * float(f)), 100) for f in factors})
        if not ratios or ratios[0] <= 0:
            raise ValueError(f"augment.speed factors must be positive (at least 0.01), not {list(factors)}")
        self.ratios = ratios

    @property
    def slowest(self) -> float:
        return float(self.ratios[0])

    @property
    def fastest(self) -> float:
        return float(self.ratios[-1])

    def __call__(self, audio: torch.Tensor, lengths: list[int], draws: Draws) -> tuple[torch.Tensor, list[int]]:
        which = torch.randint(len(self.ratios), (len(lengths),), generator=draws.host).tolist()
        # Read faster by num/den: n samples become ceil(n * den / num), as resample gives them.
        new = [
            math.ceil(n * self.ratios[k].denominator / self.ratios[k].numerator)
            for n, k in zip(lengths, which, strict=True)
        ]
        out = audio.new_zeros(len(lengths), max(new))
        for k, ratio in enumerate(self.ratios):
            rows = [b for b, choice in enumerate(which) if choice == k]
            if not rows:
                continue
            width = max(lengths[b] for b in rows)
            group = audio[rows, :width]
            if ratio != 1:  # the rows' zero padding is what resample pads with: their valid samples come out alike
                group = AF.resample(group, ratio.numerator, ratio.denominator)
            out[rows, : group.shape[1]] = group
        return out * valid(new, out.shape[1], out.device), new


class AudioBank:
    """The audio files of a folder (FLAC and WAV, in any subfolder: MUSAN's layout or any other), read once (at the
    DataModule's setup) and kept in memory: their first channel at ``sample_rate``, peak-normalised, as 16-bit PCM
    in one flat tensor (``trim_to_peak``: from the loudest sample on, the direct path of a room impulse response). A
    file that cannot be used (undecodable, empty, silent) is skipped, counted and named in the log
    (``on_error="skip"``) or raises a :class:`DataError` naming it (``"raise"``)."""

    def __init__(self, name: str, folder: str, sample_rate: int, on_error: str, trim_to_peak: bool = False) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"data.on_error must be 'raise' or 'skip', not {on_error!r}")
        self.name, self.folder = name, Path(folder).expanduser()
        self.sample_rate, self.on_error, self.trim_to_peak = sample_rate, on_error, trim_to_peak
        self._samples: torch.Tensor | None = None
        self.starts = self.lengths = torch.zeros(0, dtype=torch.long)
        self.files: list[str] = []

    def __len__(self) -> int:
        self.load()
        return len(self.files)

    def load(self) -> torch.Tensor:
        """All the files' samples, end to end (read on the first call)."""
        if self._samples is not None:
            return self._samples
        if not self.folder.is_dir():
            raise DataError(f"augment.{self.name}.folder={self.folder}: no such folder")
        paths = sorted(p for p in self.folder.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
        read = [(path, self._read(path)) for path in paths]
        problems = apply_policy([clip for _, clip in read if isinstance(clip, Problem)], self.on_error)
        clips = [clip for _, clip in read if not isinstance(clip, Problem)]
        self.files = [str(path) for path, clip in read if not isinstance(clip, Problem)]
        if problems:
            log.warning(
                "augment.%s: skipped %d of %d files in %s:\n%s",
                self.name,
                len(problems),
                len(paths),
                self.folder,
                describe(problems),
            )
        if not clips:
            raise DataError(
                f"augment.{self.name}.folder={self.folder}: no usable FLAC or WAV files ({len(paths)} found)"
            )
        self.lengths = torch.tensor([len(c) for c in clips], dtype=torch.long)
        self.starts = torch.cumsum(self.lengths, 0) - self.lengths
        self._samples = torch.from_numpy(np.concatenate(clips))
        log.info(
            "augment.%s: %d files, %.2f h, from %s",
            self.name,
            len(clips),
            len(self._samples) / self.sample_rate / 3600,
            self.folder,
        )
        return self._samples

    def _read(self, path: Path) -> np.ndarray | Problem:
        try:
            audio, rate = sf.read(path, dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as err:
            return Problem("undecodable audio", str(path), str(err))
        audio = audio[:, 0]
        if rate != self.sample_rate:
            audio = AF.resample(torch.from_numpy(audio), rate, self.sample_rate).numpy()
        if not len(audio):
            return Problem("empty audio", str(path), "no samples")
        if self.trim_to_peak:
            audio = audio[int(np.abs(audio).argmax()) :]
        peak = float(np.abs(audio).max())
        if peak == 0:
            return Problem("silent audio", str(path), "every sample is zero")
        return np.round(audio / peak * 32767).astype(np.int16)

    def crops(self, files: torch.Tensor, offsets: torch.Tensor, width: int) -> torch.Tensor:
        """(batch, width) int16 on the host: row b from sample ``offsets[b]`` of file ``files[b]`` on, the file
        repeated as often as the width needs."""
        samples = self.load()
        lengths = self.lengths[files][:, None]
        positions = (offsets[:, None] + torch.arange(width)[None, :]) % lengths
        return samples[self.starts[files][:, None] + positions]


class Reverb:
    """Each utterance chosen (probability ``p``) convolved with a room impulse response drawn from the files of
    ``folder`` (e.g. OpenSLR 28's RIRS_NOISES/simulated_rirs), by FFT. The response starts at its direct path (its
    loudest sample) and has unit energy, so the speech keeps its timing and about its level; the reverberant tail
    past the utterance's end is cut: lengths do not change."""

    def __init__(self, folder: str, p: float = 0.5, *, sample_rate: int, on_error: str = "skip") -> None:
        _check_probability("reverb", p)
        self.p = p
        self.bank = AudioBank("reverb", folder, sample_rate, on_error, trim_to_peak=True)

    def __call__(self, audio: torch.Tensor, lengths: list[int], draws: Draws) -> tuple[torch.Tensor, list[int]]:
        batch, width = audio.shape
        apply = chosen(self.p, batch, draws.host)
        files = torch.randint(len(self.bank), (batch,), generator=draws.host)
        size = int(self.bank.lengths[files].max())
        rirs = self.bank.crops(files, torch.zeros(batch, dtype=torch.long), size)
        rirs = rirs * (torch.arange(size)[None, :] < self.bank.lengths[files][:, None])
        rirs = rirs.to(audio.device, non_blocking=True).float()
        rirs = rirs / rirs.square().sum(1, keepdim=True).sqrt()
        wet = AF.fftconvolve(audio, rirs)[:, :width] * valid(lengths, width, audio.device)
        return torch.where(apply.to(audio.device, non_blocking=True)[:, None], wet, audio), lengths


class AdditiveNoise:
    """Noise added to each utterance chosen (probability ``p``) at a signal-to-noise ratio drawn uniformly from
    ``snr`` (dB), both powers measured over the utterance's samples (not its padding): from the files of ``folder``
    (MUSAN's noise/ or music/, or any folder), a random file from a random offset, repeated when shorter; or white
    noise without a folder."""

    def __init__(
        self,
        snr: Sequence[float] = (10.0, 20.0),
        p: float = 0.5,
        folder: str | None = None,
        *,
        sample_rate: int,
        on_error: str = "skip",
    ) -> None:
        _check_probability("noise", p)
        self.snr, self.p = _check_range("noise.snr", snr), p
        self.bank = None if folder is None else AudioBank("noise", folder, sample_rate, on_error)

    def __call__(self, audio: torch.Tensor, lengths: list[int], draws: Draws) -> tuple[torch.Tensor, list[int]]:
        batch, width = audio.shape
        device = audio.device
        apply = chosen(self.p, batch, draws.host)
        snr = uniform(*self.snr, batch, draws.host)
        if self.bank is None:
            noise = torch.randn(batch, width, generator=draws.device, device=device)
        else:
            files = torch.randint(len(self.bank), (batch,), generator=draws.host)
            offsets = (torch.rand(batch, generator=draws.host, dtype=torch.float64) * self.bank.lengths[files]).long()
            noise = self.bank.crops(files, offsets, width).to(device, non_blocking=True).float()
        mask = valid(lengths, width, device)
        noise = noise * mask
        signal_power = audio.square().sum(1)  # over the same samples: the lengths cancel out
        noise_power = noise.square().sum(1).clamp(min=1e-20)
        gain = (signal_power / noise_power / 10 ** (snr.to(device, non_blocking=True).float() / 10)).sqrt()
        gain = gain * apply.to(device, non_blocking=True)
        return audio + gain[:, None] * noise, lengths


class Augmentation:
    """The waveform transforms of training batches, in this order: ``speed``, ``reverb``, ``noise`` (each optional)."""

    def __init__(
        self,
        speed: SpeedPerturbation | None = None,
        reverb: Reverb | None = None,
        noise: AdditiveNoise | None = None,
    ) -> None:
        self.speed, self.reverb, self.noise = speed, reverb, noise

    def load(self) -> None:
        """Read the noise and impulse-response folders (at setup: a bad folder stops the run before its first step)."""
        for transform in (self.reverb, self.noise):
            if transform is not None and transform.bank is not None:
                transform.bank.load()

    @property
    def speeds(self) -> tuple[float, float]:
        """The slowest and the fastest speed factors (1.0 for both without speed perturbation)."""
        return (self.speed.slowest, self.speed.fastest) if self.speed is not None else (1.0, 1.0)

    def __call__(self, batch: dict, key: Sequence[int]) -> dict:
        """``batch`` (a loader batch, on its device) with augmented audio, as float at the scale of 16-bit PCM, and
        its new ``lengths``. ``key``: (seed, epoch, the batch's position in the epoch on this rank, rank); each
        transform draws from generators seeded by the key and its own place in the order, so a resumed run draws
        alike, ranks draw independently, and switching one transform on or off leaves the others' draws alone."""
        lengths = [int(n) for n in batch["lengths"]]
        if not lengths:
            return batch
        audio = batch["input_values"].float()
        audio = audio * valid(
            lengths, audio.shape[1], audio.device
        )  # zero beyond the lengths, whatever the buffer held
        for place, transform in enumerate((self.speed, self.reverb, self.noise)):
            if transform is not None:
                audio, lengths = transform(audio, lengths, draws_for(key, place, audio.device))
        return {**batch, "input_values": audio, "lengths": lengths}


def draws_for(key: Sequence[int], place: int, device: torch.device) -> Draws:
    """Generators seeded from ``key`` and a transform's ``place`` (NumPy's SeedSequence mixes them)."""
    host_seed, device_seed = np.random.SeedSequence([k % 2**64 for k in (*key, place)]).generate_state(2, np.uint64)
    host = torch.Generator().manual_seed(int(host_seed))
    return Draws(host, torch.Generator(device=device).manual_seed(int(device_seed)))
