"""Transcribing audio files with a trained model (:func:`asr.checkpoint.load_trained`): any format soundfile reads, any
sample rate, any length.

The model sees what training showed it: mono 16-bit PCM at its sample rate (mixed down, resampled with torchaudio
and quantised as :class:`asr.data.checks.Checks` does), normalised by :func:`asr.data.dataset.model_inputs`. A file
longer than a chunk is read and run in overlapping chunks, so memory and the forward pass stay bounded whatever its
length: each chunk starts on a frame of the whole file, and the logits are stitched by frames at the middle of
each overlap, where both chunks have context on either side. Like a training utterance, each chunk is normalised
on its own. The whole file's logits (frames x vocabulary, 4 bytes each: 23 MB an hour at 50 frames per second and
32 tokens) are decoded at once, so a beam search with a language model sees the file as one utterance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from asr.backbones import input_facts
from asr.checkpoint import TrainedModel
from asr.data.checks import to_pcm16
from asr.data.dataset import model_inputs
from asr.decoding import Decoder

# Audio read on each side of a resampled range (at least, in seconds): torchaudio's filter reaches 6 periods of the
# lower rate, under 10 ms above 600 Hz.
RESAMPLING_MARGIN = 0.01


class AudioError(Exception):
    """A file that cannot be transcribed; the message names it and says why."""


class AudioFile:
    """A file as mono 16-bit PCM at ``rate``, read forward by ranges of samples: the whole file is never in memory.

    Mono audio at ``rate`` is read as 16-bit PCM; any other is read as float, mixed down by the mean of its channels,
    resampled with torchaudio, and quantised. A resampled range is computed from source audio with a margin on each
    side, so it equals that range of the whole file resampled, as long as it starts on a multiple of :attr:`align`.
    """

    def __init__(self, path: str | Path, rate: int) -> None:
        self.path = str(path)
        if Path(path).is_dir():
            raise AudioError(f"{path}: a folder, not an audio file")
        if not Path(path).exists():
            raise AudioError(f"{path}: no such file")
        try:
            self.file = sf.SoundFile(path)
        except (sf.LibsndfileError, RuntimeError, OSError) as err:
            raise AudioError(f"{path}: not a readable audio file ({err})") from err
        self.rate, self.source_rate = rate, self.file.samplerate
        self.direct = self.file.channels == 1 and self.source_rate == rate
        common = math.gcd(self.source_rate, rate)
        # Target sample i*up is source frame i*down: a resampled range starts on a multiple of up.
        self.up, self.down = rate // common, self.source_rate // common
        self.align = self.up
        resampled = self.source_rate != rate
        self.margin = self.up * math.ceil(RESAMPLING_MARGIN * rate / self.up) if resampled else 0
        self.samples = math.ceil(self.file.frames * rate / self.source_rate)  # as torchaudio resamples
        self.buffer = np.zeros(0, np.int16 if self.direct else np.float32)
        self.buffer_start = 0  # the source frame buffer[0] is

    @property
    def seconds(self) -> float:
        return self.file.frames / self.source_rate

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> AudioFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read(self, start: int, end: int) -> np.ndarray:
        """Samples ``[start, end)`` at ``rate``; ranges must move forward (a start never before an earlier one)."""
        if self.direct:
            return self._source(start, end)
        if start % self.align:
            raise ValueError(f"a resampled range starts on a multiple of {self.align} samples, not at {start}")
        left = min(self.margin, start)
        first = (start - left) // self.up * self.down
        last = min(self.file.frames, math.ceil((end + self.margin) * self.down / self.up))
        audio = AF.resample(torch.from_numpy(self._source(first, last)), self.source_rate, self.rate).numpy()
        return to_pcm16(audio[left : left + end - start])

    def _source(self, first: int, last: int) -> np.ndarray:
        """Source frames ``[first, last)``, mono, kept in a buffer that only moves forward."""
        if not self.buffer_start <= first <= self.buffer_start + len(self.buffer):
            raise ValueError("AudioFile is read forward, by ranges that overlap or touch")
        self.buffer = self.buffer[first - self.buffer_start :]
        self.buffer_start = first
        missing = last - (self.buffer_start + len(self.buffer))
        if missing > 0:
            try:
                block = self.file.read(missing, dtype="int16" if self.direct else "float32")
            except (sf.LibsndfileError, RuntimeError) as err:
                raise AudioError(f"{self.path}: undecodable audio ({err})") from err
            if block.ndim == 2:
                block = block.mean(axis=1, dtype=np.float32)
            if len(block) < missing:
                got = self.buffer_start + len(self.buffer) + len(block)
                raise AudioError(f"{self.path}: truncated audio ({got} of {self.file.frames} frames decode)")
            self.buffer = np.concatenate([self.buffer, block])
        return self.buffer[: last - first]


@dataclass(frozen=True)
class Chunk:
    """Samples ``[start, end)`` of a file, run on their own; the frames ``[first, last)`` of the file kept from them."""

    start: int
    end: int
    first: int
    last: int


def frames_of(samples: int, receptive_field: int, hop: int) -> int:
    """Frames of a convolutional feature encoder for ``samples`` (as transformers' _get_feat_extract_output_lengths)."""
    return 0 if samples < receptive_field else (samples - receptive_field) // hop + 1


def plan_chunks(samples: int, chunk: int, overlap: int, receptive_field: int, hop: int, align: int = 1) -> list[Chunk]:
    """The chunks of a file of ``samples``: at most ``chunk`` samples each, overlapping by at least ``overlap``, each
    starting on a frame of the file and on a multiple of ``align``. Every frame of the file is kept from exactly one
    chunk: the cut between two chunks is the frame at the middle of their overlap."""
    total = frames_of(samples, receptive_field, hop)
    if samples <= chunk:
        return [Chunk(0, samples, 0, total)]
    align = math.lcm(hop, align)
    step = (chunk - overlap) // align * align
    if overlap < receptive_field + 2 * hop or step <= 0:
        raise ValueError(
            f"chunks of {chunk} samples overlapping by {overlap} do not fit this model and file: the overlap must be "
            f"at least {receptive_field + 2 * hop} samples, and the chunk longer than the overlap by {align}"
        )
    starts = [0]
    while starts[-1] + chunk < samples:
        starts.append(starts[-1] + step)
    ends = [min(start + chunk, samples) for start in starts]
    # The frame whose window is centred on the middle of the overlap.
    cuts = [
        round(((nxt + end) / 2 - receptive_field / 2) / hop) for nxt, end in zip(starts[1:], ends[:-1], strict=True)
    ]
    bounds = [0, *cuts, total]
    return [Chunk(s, e, bounds[k], bounds[k + 1]) for k, (s, e) in enumerate(zip(starts, ends, strict=True))]


@dataclass(frozen=True)
class Transcript:
    path: str
    text: str
    seconds: float


class Transcriber:
    """Files to text with a trained model and a decoder, in chunks of ``chunk_seconds`` overlapping by
    ``overlap_seconds`` (a file no longer than a chunk is one forward pass, as in evaluation)."""

    def __init__(
        self,
        model: TrainedModel,
        decoder: Decoder,
        chunk_seconds: float = 30.0,
        overlap_seconds: float = 6.0,
        device: str | torch.device = "cpu",
    ) -> None:
        self.model = model
        self.decoder = decoder
        self.device = torch.device(device)
        self.backbone = model.backbone.to(self.device).eval()
        facts = input_facts(self.backbone.config, model.sample_rate)
        self.receptive_field = facts["min_samples"]
        self.hop = round(model.sample_rate / facts["frames_per_second"])
        self.chunk = round(chunk_seconds * model.sample_rate)
        self.overlap = round(overlap_seconds * model.sample_rate)
        least = self.receptive_field + 2 * self.hop
        if self.overlap < least or self.chunk - self.overlap < self.hop:
            raise ValueError(
                f"chunks of {chunk_seconds} s overlapping by {overlap_seconds} s: this model needs an overlap of at "
                f"least {least / model.sample_rate:.3f} s, and chunks longer than the overlap"
            )

    def __call__(self, path: str | Path) -> Transcript:
        """The transcript of ``path``, or an :class:`AudioError` that names it."""
        with AudioFile(path, self.model.sample_rate) as audio:
            logits = self.logits(audio)
            seconds = audio.seconds
        (text,) = self.decoder(logits[None], torch.tensor([len(logits)]))
        return Transcript(str(path), text, seconds)

    def logits(self, audio: AudioFile) -> torch.Tensor:
        """The logits (frames, vocabulary) of the whole file, on the CPU, computed chunk by chunk."""
        if audio.samples < self.receptive_field:
            raise AudioError(
                f"{audio.path}: shorter than the model's receptive field ({audio.samples} < {self.receptive_field} "
                "samples)"
            )
        try:
            plan = plan_chunks(audio.samples, self.chunk, self.overlap, self.receptive_field, self.hop, audio.align)
        except ValueError as err:  # the chunks cannot start on whole samples of this file's rate
            raise AudioError(f"{audio.path}: {err}") from err
        logits = torch.empty(plan[-1].last, self.backbone.config.vocab_size)
        for chunk in plan:
            offset = chunk.start // self.hop
            part = self.forward(audio.read(chunk.start, chunk.end))
            logits[chunk.first : chunk.last] = part[chunk.first - offset : chunk.last - offset]
        return logits

    @torch.inference_mode()
    def forward(self, pcm: np.ndarray) -> torch.Tensor:
        """The logits of one utterance of 16-bit PCM, as evaluation computes them for a batch of one."""
        batch = {"input_values": torch.from_numpy(pcm[None]).to(self.device), "lengths": [len(pcm)], "labels": [[]]}
        inputs = model_inputs(batch)
        logits = self.backbone(inputs["input_values"], attention_mask=inputs["attention_mask"]).logits[0]
        expected = frames_of(len(pcm), self.receptive_field, self.hop)
        if len(logits) != expected:
            raise RuntimeError(f"the model gave {len(logits)} frames for {len(pcm)} samples, not {expected}")
        return logits.float().cpu()
