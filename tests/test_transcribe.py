"""``python -m asr.transcribe``: files of any format, rate and length; chunks stitched exactly; bounded memory; bad
files named while the others are transcribed."""

import functools
import json
import math
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF
from torch import nn

from asr import transcribe
from asr.backbones import build_backbone
from asr.checkpoint import TrainedModel, load_recognizer, load_trained, save_export
from asr.data.text import CharTokenizer
from asr.decoding import GreedyDecoder
from asr.inference import AudioError, AudioFile, Transcriber, frames_of, plan_chunks, to_pcm16
from asr.model import SpeechRecognizer
from tests.helpers import TINY_HUBERT, batch_of

RATE = 16_000
# TINY_HUBERT with HuBERT's frame rate (a hop of 320 samples, 50 frames per second) and receptive field 325.
TINY_50HZ = {**TINY_HUBERT, "conv_dim": [16] * 4, "conv_kernel": [10, 4, 4, 4], "conv_stride": [5, 4, 4, 4]}


def noise(seconds: float, rate: int = RATE, channels: int = 1, seed: int = 0) -> np.ndarray:
    audio = 0.1 * np.random.default_rng(seed).standard_normal((round(seconds * rate), channels)).astype(np.float32)
    return audio[:, 0] if channels == 1 else audio


def random_model(tokenizer: CharTokenizer, config: dict = TINY_50HZ) -> TrainedModel:
    """A random HuBERT whose greedy transcripts are long and varied (a random CTC head, with <s>, </s> and <unk>
    never best: a trained head never emits them)."""
    torch.manual_seed(0)
    backbone = build_backbone(None, config, tokenizer)
    with torch.no_grad():
        backbone.lm_head.weight.normal_(0, 1.0)
        backbone.lm_head.bias[1:4] = -1e4
    return TrainedModel(backbone.eval(), tokenizer, RATE)


class LocalModel(nn.Module):
    """A stand-in CTC model whose frame t sees only its own window of samples (as the feature encoder's), and
    whose best token is the position of the window's largest sample among its first ``vocab``: unchanged by a
    chunk's normalisation (an increasing affine map), so a stitched file must give exactly the unchunked argmax."""

    def __init__(self, vocab: int = 32, kernel=(10, 4, 4, 4), stride=(5, 4, 4, 4)) -> None:
        super().__init__()
        self.config = SimpleNamespace(
            conv_kernel=list(kernel), conv_stride=list(stride), add_adapter=False, vocab_size=vocab
        )
        self.vocab, self.hop = vocab, math.prod(stride)
        self.receptive_field = 1 + sum((k - 1) * math.prod(stride[:i]) for i, k in enumerate(kernel))
        self.calls: list[int] = []

    def forward(self, input_values: torch.Tensor, attention_mask: torch.Tensor):
        self.calls.append(input_values.shape[1])
        windows = input_values.unfold(1, self.receptive_field, self.hop)
        return SimpleNamespace(logits=windows[..., : self.vocab])


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """A random model, exported as asr.export writes it."""
    return save_export(random_model(CharTokenizer()), tmp_path_factory.mktemp("tiny-export"))


def run_transcribe(*args, cwd=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "asr.transcribe", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


@pytest.mark.parametrize("samples", [1_000, 96_000, 96_001, 250_000, 1_234_567])
@pytest.mark.parametrize("align", [1, 160, 640])  # 16 kHz from 16, 44.1 and 11.025 kHz
def test_the_chunks_keep_every_frame_once(samples, align):
    chunk, overlap, receptive_field, hop = 96_000, 32_000, 400, 320
    plan = plan_chunks(samples, chunk, overlap, receptive_field, hop, align)
    assert plan[0].first == 0 and plan[-1].last == frames_of(samples, receptive_field, hop)
    assert plan[-1].end == samples
    for k, c in enumerate(plan):
        assert c.end - c.start <= chunk and c.first < c.last
        assert c.start % math.lcm(hop, align) == 0
        local = range(c.start // hop, c.start // hop + frames_of(c.end - c.start, receptive_field, hop))
        assert c.first in local and c.last - 1 in local  # kept frames are the chunk's own
        if k:
            before = plan[k - 1]
            assert before.last == c.first
            assert before.end - c.start >= overlap
            middle = (c.start + before.end) / 2  # the cut frame's window is centred on the overlap's middle
            assert abs(c.first * hop + receptive_field / 2 - middle) <= hop / 2
    if samples <= chunk:
        assert len(plan) == 1


def test_chunks_too_short_for_the_model_are_refused():
    with pytest.raises(ValueError, match="overlap must be at least 1040 samples"):
        plan_chunks(100_000, 10_000, 800, 400, 320)


def long_file(path: Path, seconds: float, rate: int, channels: int = 1) -> Path:
    """Noise written a minute at a time (never all in memory)."""
    with sf.SoundFile(path, "w", rate, channels, format=path.suffix[1:].upper()) as f:
        for k in range(math.ceil(seconds / 60)):
            f.write(noise(min(60, seconds - 60 * k), rate, channels, seed=k))
    return path


@pytest.mark.parametrize(("rate", "channels"), [(RATE, 1), (44_100, 2), (8_000, 1)])
def test_a_chunked_file_gives_the_frames_of_one_forward_pass(tmp_path, tokenizer, rate, channels):
    """Stitched by frames, chunks give exactly the best tokens of the whole file (with a model whose frames see only
    their windows): no frame lost, repeated or shifted, and resampled chunks equal the resampled file."""
    path = long_file(tmp_path / "long.flac", 95.0, rate, channels)
    model = TrainedModel(LocalModel(), tokenizer, RATE)
    whole = Transcriber(model, GreedyDecoder(tokenizer), chunk_seconds=1000)
    chunked = Transcriber(model, GreedyDecoder(tokenizer), chunk_seconds=10, overlap_seconds=2)
    with AudioFile(path, RATE) as audio:
        expected = whole.logits(audio).argmax(-1)
    with AudioFile(path, RATE) as audio:
        got = chunked.logits(audio).argmax(-1)
    assert len(got) == len(expected) == frames_of(math.ceil(95 * RATE), 325, 320)
    assert torch.equal(got, expected)
    assert max(model.backbone.calls[1:]) <= 10 * RATE and len(model.backbone.calls) == 1 + 12


def test_resampled_ranges_equal_the_resampled_file(tmp_path):
    rate = 44_100
    path = tmp_path / "stereo.wav"
    sf.write(path, noise(7.3, rate, channels=2), rate, subtype="FLOAT")
    audio, _ = sf.read(path, dtype="float32")
    reference = to_pcm16(AF.resample(torch.from_numpy(audio.mean(axis=1)), rate, RATE).numpy())
    with AudioFile(path, RATE) as f:
        assert f.samples == len(reference) and f.align == 160
        parts = [f.read(start, min(start + 40_000, f.samples)) for start in range(0, f.samples, 40_000 - 8_000)]
    stitched = np.concatenate([parts[0], *(p[8_000:] for p in parts[1:])])[: len(reference)]
    assert np.abs(stitched.astype(int) - reference).max() <= 1  # float rounding at a quantisation boundary
    assert (stitched == reference).mean() > 0.999


def test_a_short_file_is_normalised_and_run_as_evaluation_does(tmp_path, tokenizer):
    """One forward pass of the file as evaluation batches it (asr.data.dataset.model_inputs on 16-bit PCM)."""
    model = SpeechRecognizer(tokenizer, functools.partial(torch.optim.AdamW), config=TINY_50HZ)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, max_steps=0)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    path = tmp_path / "a.flac"
    sf.write(path, noise(3.0), RATE, subtype="PCM_16")
    pcm, _ = sf.read(path, dtype="float32")
    batch = batch_of([torch.from_numpy(pcm)], [[]])
    with torch.no_grad():
        expected, _ = load_recognizer(tmp_path / "model.ckpt", tokenizer).eval()(
            batch["input_values"], batch["attention_mask"]
        )
    transcriber = Transcriber(load_trained(tmp_path / "model.ckpt"), GreedyDecoder(tokenizer))
    with AudioFile(path, RATE) as audio:
        got = transcriber.logits(audio)
    torch.testing.assert_close(got, expected[0], rtol=1e-4, atol=1e-4)


def test_formats_rates_and_channels(tmp_path, tiny_export):
    """The same 16-bit samples as WAV, or as two equal channels, give the FLAC's transcript; OGG, MP3 and other
    rates give one."""
    mono = noise(2.5)
    sf.write(tmp_path / "a.flac", mono, RATE, subtype="PCM_16")
    sf.write(tmp_path / "a.wav", mono, RATE, subtype="PCM_16")
    sf.write(tmp_path / "stereo.flac", np.stack([mono, mono], 1), RATE, subtype="PCM_16")
    sf.write(tmp_path / "a.ogg", mono, RATE)
    sf.write(tmp_path / "a.mp3", mono, RATE)
    sf.write(tmp_path / "a-22k.flac", noise(2.5, 22_050), 22_050)
    files = ["a.flac", "a.wav", "stereo.flac", "a.ogg", "a.mp3", "a-22k.flac"]
    result = run_transcribe(tiny_export, *files, "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["path"] for line in lines] == files
    texts = {line["path"]: line["text"] for line in lines}
    assert len(texts["a.flac"]) > 10
    assert texts["a.wav"] == texts["a.flac"] == texts["stereo.flac"]
    assert all(texts.values())
    assert [line["seconds"] for line in lines] == pytest.approx([2.5] * 6, abs=0.06)  # MP3 pads a little


def test_a_broken_file_is_named_and_the_others_transcribed(tmp_path, tiny_export, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    sf.write("good.flac", noise(1.5), RATE)
    sf.write("cut.flac", noise(4.0, seed=1), RATE)
    whole = Path("cut.flac").read_bytes()
    Path("cut.flac").write_bytes(whole[: len(whole) // 2])
    Path("notes.txt").write_text("not audio")
    sf.write("tiny.wav", noise(0.01), RATE)
    sf.write("good2.wav", noise(1.0, seed=2), RATE)
    files = ["good.flac", "missing.flac", "cut.flac", "notes.txt", "tiny.wav", "good2.wav"]
    assert transcribe.main([str(tiny_export), *files]) == 1
    out, errors = capsys.readouterr()
    assert [line.split("\t")[0] for line in out.splitlines()] == ["good.flac", "good2.wav"]
    assert "missing.flac: no such file" in errors
    assert "cut.flac: undecodable audio" in errors or "cut.flac: truncated audio" in errors
    assert "notes.txt: not a readable audio file" in errors
    assert "tiny.wav: shorter than the model's receptive field" in errors
    assert "4 of 6 files failed" in errors


def test_an_hour_is_read_and_run_in_bounded_memory(tmp_path, tokenizer):
    """An hour of 8 kHz audio (resampled) runs in forward passes of at most a chunk, and the audio path's arrays
    (traced by tracemalloc: numpy's) never come near the hour's size: 115 MB as float at 8 kHz."""
    path = long_file(tmp_path / "hour.flac", 3600, 8_000)
    model = TrainedModel(LocalModel(), tokenizer, RATE)
    transcriber = Transcriber(model, GreedyDecoder(tokenizer))
    tracemalloc.start()
    try:
        result = transcriber(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.seconds == 3600 and len(result.text) > 1000
    calls = model.backbone.calls
    assert max(calls) <= 30 * RATE and len(calls) == math.ceil((3600 - 30) / 24) + 1
    assert peak < 30e6, f"{peak / 1e6:.0f} MB traced"


@pytest.mark.slow
def test_a_long_file_runs_in_bounded_memory(tmp_path, tiny_export):
    """The command as a user runs it on an hour of 8 kHz audio: its peak memory barely above that for a minute,
    while the hour alone would take 115 MB as 16-bit PCM at the model's rate (230 MB as float)."""
    hour = long_file(tmp_path / "hour.flac", 3600, 8_000)
    minute = long_file(tmp_path / "minute.flac", 60, 8_000)
    script = (
        "import resource, runpy, sys\n"
        "sys.argv = ['asr.transcribe', *sys.argv[1:]]\n"
        "try:\n    runpy.run_module('asr.transcribe', run_name='__main__')\n"
        "finally:\n    print('peak', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
    )

    def peak_mb(path):
        result = subprocess.run(
            [sys.executable, "-c", script, str(tiny_export), str(path), "--json"],
            capture_output=True,
            text=True,
            timeout=1200,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert json.loads(result.stdout)["seconds"] == pytest.approx(sf.info(path).duration)
        return int(result.stderr.rsplit("peak ", 1)[1]) / 1024

    grown = peak_mb(hour) - peak_mb(minute)
    # What grows: the logits (3600 s x 50 frames x 32 tokens x 4 bytes = 23 MB) and greedy decoding's token list.
    assert grown < 60, f"peak memory grew by {grown:.0f} MB"


def test_decoder_overrides_and_their_errors(tmp_path, tiny_export, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    sf.write("a.flac", noise(2.0), RATE)
    assert transcribe.main([str(tiny_export), "a.flac", "decoder=beam", "decoder.beam_size=4", "--json"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["path"] == "a.flac" and len(line["text"]) > 10
    with pytest.raises(SystemExit, match="nope"):
        transcribe.main([str(tiny_export), "a.flac", "decoder=nope"])


def test_a_model_that_is_not_one_is_named(tmp_path):
    with pytest.raises(SystemExit, match="nowhere.ckpt: no such file"):
        transcribe.main([str(tmp_path / "nowhere.ckpt"), "a.flac"])
    with pytest.raises(SystemExit, match="not a model folder of asr.export"):
        transcribe.main([str(tmp_path), "a.flac"])


def test_a_folder_is_not_audio(tmp_path):
    with pytest.raises(AudioError, match=f"{tmp_path}: a folder, not an audio file"):
        AudioFile(tmp_path, RATE)
