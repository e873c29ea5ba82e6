"""Waveform augmentation (asr/data/augment.py): each transform's shapes, lengths and promised SNR, its noise and RIR
folders, seeded draws (same key, same batch; ranks and positions apart), the DataModule's wiring (training only,
resumed position, speed-aware budget and CTC check), and training with ``augment=...`` on one and on two ranks."""

import itertools
import json
import logging
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF

from asr.builders import build_datamodule
from asr.config import compose
from asr.data.augment import AdditiveNoise, Augmentation, Reverb, SpeedPerturbation
from asr.data.checks import Checks
from asr.data.dataset import model_inputs
from asr.data.librispeech import DataError, Utterance
from tests.helpers import TINY_MODEL, make_datamodule, ready, run_train

RATE = 16_000


def pcm_batch(lengths, seed=0, frequency=None):
    """A loader batch: int16 PCM rows (noise, or a sine of ``frequency`` Hz) zero beyond ``lengths``."""
    generator = torch.Generator().manual_seed(seed)
    audio = torch.zeros(len(lengths), max(lengths))
    for b, n in enumerate(lengths):
        if frequency is None:
            audio[b, :n] = 3000 * torch.randn(n, generator=generator)
        else:
            audio[b, :n] = 3000 * torch.sin(2 * math.pi * frequency * torch.arange(n) / RATE)
    return {
        "input_values": audio.round().short(),
        "lengths": list(lengths),
        "ids": [str(b) for b in range(len(lengths))],
    }


def snr_db(clean, noisy, n):
    """The SNR of ``noisy`` against ``clean`` over their first ``n`` samples."""
    return float(10 * torch.log10(clean[:n].square().sum() / (noisy[:n] - clean[:n]).square().sum()))


def assert_zero_padding(audio, lengths):
    for b, n in enumerate(lengths):
        assert not audio[b, n:].any()


# ------------------------------------------------------------------------------------------------------ speed


def test_speed_rows_are_each_utterance_resampled_alone():
    lengths = [16_000, 12_345, 7_001]
    batch = pcm_batch(lengths, frequency=1000)
    out = Augmentation(speed=SpeedPerturbation(factors=[1.1]))(batch, (0, 0, 0, 0))
    assert out["lengths"] == [math.ceil(n / 1.1) for n in lengths]
    assert out["input_values"].shape == (3, max(out["lengths"]))
    assert_zero_padding(out["input_values"], out["lengths"])
    for b, n in enumerate(lengths):
        alone = AF.resample(batch["input_values"][b, :n].float(), 11, 10)
        assert torch.allclose(out["input_values"][b, : len(alone)], alone, atol=0.1)
    # Faster: a 1 kHz tone becomes 1.1 kHz.
    spectrum = torch.fft.rfft(out["input_values"][0, : out["lengths"][0]]).abs()
    assert float(spectrum.argmax()) * RATE / out["lengths"][0] == pytest.approx(1100, abs=5)


def test_speed_draws_a_factor_per_utterance():
    lengths = [RATE] * 64
    out = Augmentation(speed=SpeedPerturbation(factors=[0.9, 1.0, 1.1]))(pcm_batch(lengths), (3, 0, 0, 0))
    assert set(out["lengths"]) == {math.ceil(RATE / 0.9), RATE, math.ceil(RATE / 1.1)}
    assert out["input_values"].shape[1] == math.ceil(RATE / 0.9)
    assert_zero_padding(out["input_values"], out["lengths"])


def test_speed_range_and_bad_settings():
    speed = SpeedPerturbation(range=[0.9, 1.1], step=0.05)
    assert [float(r) for r in speed.ratios] == [0.9, 0.95, 1.0, 1.05, 1.1]
    assert (speed.slowest, speed.fastest) == (0.9, 1.1)
    for bad in (dict(), dict(factors=[1.0], range=[0.9, 1.1]), dict(factors=[0.0, 1.0]), dict(range=[1.1, 0.9])):
        with pytest.raises(ValueError, match="augment.speed"):
            SpeedPerturbation(**bad)


# ------------------------------------------------------------------------------------------------------ noise


def test_white_noise_at_the_promised_snr_over_the_valid_samples():
    lengths = [16_000, 9_000, 4_000]
    batch = pcm_batch(lengths)
    out = Augmentation(noise=AdditiveNoise(snr=[7.5, 7.5], p=1.0, sample_rate=RATE))(batch, (0, 0, 0, 0))
    assert out["lengths"] == lengths and out["input_values"].shape == batch["input_values"].shape
    assert_zero_padding(out["input_values"], lengths)
    clean = batch["input_values"].float()
    for b, n in enumerate(lengths):
        assert snr_db(clean[b], out["input_values"][b], n) == pytest.approx(7.5, abs=0.01)


def test_noise_snr_is_drawn_from_the_range_and_p_leaves_some_utterances_clean():
    lengths = [8_000] * 64
    batch = pcm_batch(lengths)
    out = Augmentation(noise=AdditiveNoise(snr=[0, 20], p=0.5, sample_rate=RATE))(batch, (0, 0, 0, 0))
    clean = batch["input_values"].float()
    untouched = [b for b in range(64) if torch.equal(out["input_values"][b], clean[b])]
    assert 16 < len(untouched) < 48
    snrs = [snr_db(clean[b], out["input_values"][b], 8_000) for b in range(64) if b not in untouched]
    assert all(-0.01 < s < 20.01 for s in snrs) and max(snrs) - min(snrs) > 10


@pytest.fixture
def noise_folder(tmp_path):
    """MUSAN's layout: noise/<source>/*.wav; one file at 8 kHz, one stereo, one empty, one that is not audio."""
    folder = tmp_path / "musan" / "noise"
    rng = np.random.default_rng(0)
    (folder / "free-sound").mkdir(parents=True)
    (folder / "sound-bible").mkdir()
    sf.write(folder / "free-sound" / "noise-0001.wav", 0.2 * rng.standard_normal(RATE // 2), RATE)
    sf.write(folder / "free-sound" / "noise-0002.flac", 0.2 * rng.standard_normal(RATE // 4), 8_000)
    sf.write(folder / "sound-bible" / "noise-0003.wav", 0.2 * rng.standard_normal((RATE, 2)), RATE)
    sf.write(folder / "sound-bible" / "empty.wav", np.zeros(0), RATE)
    (folder / "sound-bible" / "broken.wav").write_bytes(b"RIFF not a wave file")
    (folder / "README").write_text("not audio, not read")
    return folder


def test_noise_folder_skips_bad_files_naming_them_and_is_read_once(noise_folder, caplog, monkeypatch):
    noise = AdditiveNoise(snr=[10, 10], p=1.0, folder=str(noise_folder), sample_rate=RATE, on_error="skip")
    reads = []
    original = sf.read
    monkeypatch.setattr(sf, "read", lambda path, **kw: reads.append(path) or original(path, **kw))
    lengths = [24_000, 5_000]  # longer than every noise file: they repeat
    augment = Augmentation(noise=noise)
    with caplog.at_level(logging.INFO, logger="asr.data.augment"):
        batches = [augment(pcm_batch(lengths, seed=k), (0, 0, k, 0)) for k in range(3)]
    assert len(reads) == 5  # each file once, for all batches
    assert noise.bank.files == [
        str(noise_folder / "free-sound" / "noise-0001.wav"),
        str(noise_folder / "free-sound" / "noise-0002.flac"),
        str(noise_folder / "sound-bible" / "noise-0003.wav"),
    ]
    assert int(noise.bank.lengths[1]) == RATE // 2  # 8 kHz, resampled
    warning = next(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "skipped 2 of 5 files" in warning
    assert "undecodable audio: 1\n    " + str(noise_folder / "sound-bible" / "broken.wav") in warning
    assert "empty audio: 1\n    " + str(noise_folder / "sound-bible" / "empty.wav") in warning
    for k, out in enumerate(batches):
        clean = pcm_batch(lengths, seed=k)["input_values"].float()
        for b, n in enumerate(lengths):
            assert snr_db(clean[b], out["input_values"][b], n) == pytest.approx(10, abs=0.01)
        assert_zero_padding(out["input_values"], lengths)


def test_noise_folder_with_a_bad_file_under_raise_names_it(noise_folder):
    noise = AdditiveNoise(folder=str(noise_folder), p=1.0, sample_rate=RATE, on_error="raise")
    with pytest.raises(DataError, match=r"broken\.wav: undecodable audio"):
        Augmentation(noise=noise)(pcm_batch([4_000]), (0, 0, 0, 0))


def test_a_bad_noise_folder_stops_the_run_at_setup(demo_root, tokenizer, tmp_path):
    noise = AdditiveNoise(folder=str(tmp_path / "nowhere"), sample_rate=RATE)
    dm = make_datamodule(demo_root, tokenizer, augment=Augmentation(noise=noise))
    with pytest.raises(DataError, match="augment.noise.folder=.*no such folder"):
        ready(dm, "fit")


def test_noise_folder_without_usable_audio(tmp_path):
    (tmp_path / "empty").mkdir()
    for folder, message in ((tmp_path / "empty", "no usable FLAC or WAV files"), (tmp_path / "nowhere", "no such")):
        noise = AdditiveNoise(folder=str(folder), sample_rate=RATE)
        with pytest.raises(DataError, match=f"augment.noise.folder=.*{message}"):
            Augmentation(noise=noise)(pcm_batch([4_000]), (0, 0, 0, 0))


# ----------------------------------------------------------------------------------------------------- reverb


def test_reverb_keeps_lengths_and_timing(tmp_path):
    """A response that is a delayed impulse leaves the speech as it was (its delay is cut off); a decaying one
    smears it, and the valid samples only."""
    folder = tmp_path / "rirs"
    folder.mkdir()
    impulse = np.zeros(800)
    impulse[100] = 0.5
    sf.write(folder / "impulse.wav", impulse, RATE)
    lengths = [12_000, 5_000]
    batch = pcm_batch(lengths)
    clean = batch["input_values"].float()
    out = Augmentation(reverb=Reverb(str(folder), p=1.0, sample_rate=RATE))(batch, (0, 0, 0, 0))
    assert out["lengths"] == lengths and out["input_values"].shape == clean.shape
    assert torch.allclose(out["input_values"], clean, atol=0.5)

    decay = np.random.default_rng(0).standard_normal(4000) * np.exp(-np.arange(4000) / 800)
    sf.write(folder / "impulse.wav", decay, RATE)
    out = Augmentation(reverb=Reverb(str(folder), p=1.0, sample_rate=RATE))(batch, (0, 0, 0, 0))
    assert out["lengths"] == lengths
    assert_zero_padding(out["input_values"], lengths)
    assert not torch.allclose(out["input_values"], clean, atol=100)


# -------------------------------------------------------------------------------------------------- the draws


def full_augmentation(p=1.0):
    return Augmentation(
        speed=SpeedPerturbation(factors=[0.9, 1.0, 1.1]), noise=AdditiveNoise(snr=[0, 20], p=p, sample_rate=RATE)
    )


def test_draws_follow_the_key_alone():
    augment, lengths = full_augmentation(), [9_000, 16_000, 12_000, 3_000]
    same = [augment(pcm_batch(lengths), (42, 1, 5, 0)) for _ in range(2)]
    assert same[0]["lengths"] == same[1]["lengths"]
    assert torch.equal(same[0]["input_values"], same[1]["input_values"])
    for key in ((42, 1, 5, 1), (42, 1, 6, 0), (42, 2, 5, 0), (43, 1, 5, 0)):  # another rank, batch, epoch, seed
        other = augment(pcm_batch(lengths), key)
        assert other["input_values"].shape != same[0]["input_values"].shape or not torch.equal(
            other["input_values"], same[0]["input_values"]
        )


def test_a_transform_draws_the_same_whatever_else_is_on():
    lengths = [9_000, 16_000]
    noise = AdditiveNoise(snr=[0, 20], p=1.0, sample_rate=RATE)
    alone = Augmentation(noise=noise)(pcm_batch(lengths), (1, 0, 0, 0))
    with_speed = Augmentation(speed=SpeedPerturbation(factors=[1.0]), noise=noise)(pcm_batch(lengths), (1, 0, 0, 0))
    assert torch.equal(alone["input_values"], with_speed["input_values"])


def test_draws_leave_the_global_generators_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    full_augmentation()(pcm_batch([4_000, 2_000]), (0, 0, 0, 0))
    assert torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------------------------------------- the DataModule


def test_datamodule_augments_training_batches_by_their_place_and_resumes_alike(demo_root, tokenizer):
    augment = full_augmentation()
    dm = ready(make_datamodule(demo_root, tokenizer, augment=augment, seed=7, max_batch_seconds=4))
    raw = list(itertools.islice(dm.train_dataloader(), 4))
    seen = [dm.on_after_batch_transfer(batch, 0) for batch in itertools.islice(dm.train_dataloader(), 4)]
    for index, (batch, got) in enumerate(zip(raw, seen, strict=True)):
        expected = model_inputs(augment(batch, (7, 0, index, 0)))
        assert torch.equal(got["input_values"], expected["input_values"])
    # Resumed at batch 2 of epoch 0: the same batches, augmented alike.
    resumed = ready(make_datamodule(demo_root, tokenizer, augment=augment, seed=7, max_batch_seconds=4))
    resumed.load_state_dict({"epoch": 0, "batches": 2})
    again = [resumed.on_after_batch_transfer(batch, 0) for batch in itertools.islice(resumed.train_dataloader(), 2)]
    for got, expected in zip(again, seen[2:], strict=True):
        assert got["ids"] == expected["ids"] and torch.equal(got["input_values"], expected["input_values"])


def test_evaluation_batches_are_not_augmented(demo_root, tokenizer):
    class Evaluating:
        current_epoch, global_rank, world_size = 0, 0, 1

        class state:
            class stage:
                value = "validate"

    dm = ready(make_datamodule(demo_root, tokenizer, augment=full_augmentation()), "validate")
    dm.trainer = Evaluating()
    (loader,) = dm.val_dataloader()
    batch = next(iter(loader))
    assert torch.equal(dm.on_after_batch_transfer(dict(batch), 0)["input_values"], model_inputs(batch)["input_values"])


def test_speed_perturbation_shrinks_the_training_budget_and_tightens_the_ctc_check(demo_root, tokenizer):
    dm = make_datamodule(demo_root, tokenizer, augment=Augmentation(speed=SpeedPerturbation(factors=[0.8, 1.25])))
    assert dm.budget.max_batch_seconds == pytest.approx(8.0)  # 10 s once slowed down by 0.8
    assert dm.checks.max_batch_seconds == pytest.approx(8.0) and dm.checks.max_speed == 1.25
    assert make_datamodule(demo_root, tokenizer).budget.max_batch_seconds == 10
    # 14 CTC frames needed: 14 in 0.3 s at 50 frames/s (receptive field 400 samples), 11 once 1.25 times faster.
    utt = Utterance("1-2-0003", "x.flac", "ABCDEFGHIJKLMN", "1", int(0.3 * RATE), RATE)
    assert Checks(tokenizer).problem(utt, True) is None
    problem = Checks(tokenizer, max_speed=1.25).problem(utt, True)
    assert problem.reason == "label longer than the output frames" and "at speed 1.25" in problem.detail
    assert Checks(tokenizer, max_speed=1.25).problem(utt, False) is None  # evaluation keeps it


# ------------------------------------------------------------------------------------------------- training


def demo_data(root):
    return ["experiment=demo", f"data.root={root}", "data/source=folder"]


class RecordBatches(L.Callback):
    """Saves the first ``batches`` training batches of each rank (ids, model inputs) to ``folder``."""

    def __init__(self, folder: str, batches: int = 2) -> None:
        self.folder, self.batches = Path(folder), batches

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx < self.batches:
            record = {k: batch[k] for k in ("ids", "input_values", "lengths")}
            path = self.folder / f"{trainer.global_rank}-{trainer.current_epoch}-{batch_idx}.pt"
            torch.save(record, path)


def test_training_on_two_ranks_augments_as_one_process_given_their_rank(demo_root, tmp_path):
    """``augment=...`` end to end under DDP (2 CPU ranks): each rank's augmented batches are what one process computes
    for that rank; the group's SpecAugment is the model's."""
    folder = tmp_path / "batches"
    folder.mkdir()
    augment = ["augment=speed_noise", "augment.noise.p=1.0", "++augment.specaugment.mask_time_prob=0.3"]
    result = run_train(
        *demo_data(demo_root),
        *augment,
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "trainer.max_steps=2",
        "trainer.max_time=null",
        "+trainer.limit_val_batches=0",
        "+trainer.limit_test_batches=1",
        "~logger",
        "+callbacks.record._target_=tests.test_augment.RecordBatches",
        f"+callbacks.record.folder={folder}",
        *TINY_MODEL,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = tmp_path.glob("outputs/*/*/metrics.json")
    metrics = json.loads(path.read_text())
    assert "test/wer" in metrics and math.isfinite(metrics["train/loss"])
    checkpoint = torch.load(metrics["checkpoint"], map_location="cpu", weights_only=False)
    assert checkpoint["hyper_parameters"]["config"]["mask_time_prob"] == 0.3
    assert checkpoint["backbone_config"]["mask_time_prob"] == 0.3
    cfg = compose("train", [*demo_data(demo_root), *augment])
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    utterances = {u.id: u for u in dm.catalog.load("train", True)}
    records = sorted(folder.glob("*.pt"))
    assert {p.name for p in records} == {"0-0-0.pt", "0-0-1.pt", "1-0-0.pt", "1-0-1.pt"}
    for path in records:
        rank, epoch, index = map(int, path.stem.split("-"))
        recorded = torch.load(path)
        batch = dm.checks.batch([(utterances[i], dm.source.open(utterances[i])) for i in recorded["ids"]], "raise")
        expected = model_inputs(dm.augment(batch, (cfg.seed, epoch, index, rank)))
        assert torch.equal(recorded["lengths"], expected["lengths"])
        assert torch.allclose(recorded["input_values"], expected["input_values"], atol=1e-4)
