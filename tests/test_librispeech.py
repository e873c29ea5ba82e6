"""The folder reader, split names, sources and the checks that make an utterance usable. The mini corpus built
here (every kind of bad input) is shared with the archive, manifest and DataModule tests."""

import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from asr.data.datamodule import SpeechLoader
from asr.data.dataset import Checks, SpeechDataset, model_inputs, pcm_buffer
from asr.data.librispeech import DataError, Problem, apply_policy, locate, parts, scan_directory
from tests.conftest import write_flac

# Usable utterances of the mini corpus: id -> transcript. 174-50561-0002 is truncated (its header reads, its
# audio does not decode); 174-50561-0006 has more letters than a 0.3 s clip has CTC frames (kept for
# evaluation).
USABLE = {
    "84-121123-0000": "GO DO YOU HEAR",
    "84-121123-0001": "BUT IN LESS THAN FIVE MINUTES",
    "174-50561-0000": "FORGOTTEN TOO THE NAME OF GILLIAN",
    "174-50561-0002": "A TRUNCATED FILE",
    "174-50561-0006": "A SENTENCE FAR TOO LONG FOR A THIRD OF A SECOND",
}
SOURCE_PROBLEMS = {  # found by scanning transcripts and headers: id -> reason
    "84-121123-0002": "audio without transcript",
    "84-121123-0003": "empty transcript",
    "84-121123-0009": "transcript without audio",
    "174-50561-0001": "unreadable audio",
    "2-3-0000": "audio without transcript",
}
CHECK_PROBLEMS = {  # found by Checks.problem
    "174-50561-0003": "wrong sample rate",
    "174-50561-0004": "shorter than the receptive field",
    "174-50561-0005": "characters outside the vocabulary",
}


def write_corpus(root: Path, split: str = "dev-clean") -> Path:
    """A mini LibriSpeech split with one utterance for every kind of bad input."""
    folder = root / "LibriSpeech" / split
    chapter = folder / "84" / "121123"
    write_flac(chapter / "84-121123-0000.flac", 1.0)
    write_flac(chapter / "84-121123-0001.flac", 2.5)
    write_flac(chapter / "84-121123-0002.flac", 0.5)
    write_flac(chapter / "84-121123-0003.flac", 0.7)
    (chapter / "84-121123.trans.txt").write_text(
        f"84-121123-0000 {USABLE['84-121123-0000']}\n84-121123-0001 {USABLE['84-121123-0001']}\n"
        "84-121123-0003\n84-121123-0009 MISSING AUDIO\n"
    )
    chapter = folder / "174" / "50561"
    write_flac(chapter / "174-50561-0000.flac", 1.5)
    (chapter / "174-50561-0001.flac").write_bytes(b"fLaC not really")
    write_flac(chapter / "174-50561-0002.flac", 2.0)
    whole = (chapter / "174-50561-0002.flac").read_bytes()
    (chapter / "174-50561-0002.flac").write_bytes(whole[: len(whole) // 2])
    write_flac(chapter / "174-50561-0003.flac", 1.0, rate=8_000)
    sf.write(chapter / "174-50561-0004.flac", np.zeros(100, np.float32), 16_000, format="FLAC")
    write_flac(chapter / "174-50561-0005.flac", 1.0)
    write_flac(chapter / "174-50561-0006.flac", 0.3)
    (chapter / "174-50561.trans.txt").write_text(
        f"174-50561-0000 {USABLE['174-50561-0000']}\n174-50561-0001 A CORRUPT FILE\n"
        f"174-50561-0002 {USABLE['174-50561-0002']}\n174-50561-0003 EIGHT KILOHERTZ\n"
        "174-50561-0004 TOO SHORT\n"
        f"174-50561-0005 CAFÉ NOIR\n174-50561-0006 {USABLE['174-50561-0006']}\n"
    )
    write_flac(folder / "2" / "3" / "2-3-0000.flac", 1.0)  # a chapter without any transcript file
    return folder


def make_archive(root: Path, split: str, archive: Path, transcripts_first: bool = False) -> Path:
    """``root/LibriSpeech/<split>`` as an OpenSLR-style ``.tar.gz``; by default every transcript comes after
    the audio of its chapter."""
    files = sorted(p for p in (root / "LibriSpeech" / split).rglob("*") if p.is_file())
    files.sort(key=lambda p: (p.parent, p.name.endswith(".trans.txt") != transcripts_first))
    with tarfile.open(archive, "w:gz") as tar:
        for path in files:
            tar.add(path, arcname=str(path.relative_to(root)))
    return archive


def key(problem: Problem) -> str:
    return Path(problem.where.rpartition(":")[2]).name.removesuffix(".flac")


def test_scan_finds_every_utterance_and_problem(tmp_path):
    utterances, problems = scan_directory(write_corpus(tmp_path))
    expected_ids = sorted([*USABLE, *CHECK_PROBLEMS])
    assert [u.id for u in utterances] == expected_ids
    assert {u.id: u.transcript for u in utterances if u.id in USABLE} == USABLE
    first = next(u for u in utterances if u.id == "84-121123-0000")
    assert (first.speaker, first.duration, first.sample_rate, first.num_samples) == ("84", 1.0, 16000, 16000)
    assert {key(p): p.reason for p in problems} == SOURCE_PROBLEMS
    assert all(Path(p.where.partition(":")[0]).exists() or "*" in p.where for p in problems)  # a file, or its line


def test_checks_name_the_reason(tmp_path, tokenizer):
    utterances, _ = scan_directory(write_corpus(tmp_path))
    checks = Checks(tokenizer)
    found = {u.id: checks.problem(u, for_training=True) for u in utterances}
    assert {i: p.reason for i, p in found.items() if p} == {
        **CHECK_PROBLEMS, "174-50561-0006": "label longer than the output frames"}
    assert checks.problem(next(u for u in utterances if u.id == "174-50561-0006"), for_training=False) is None
    resampling = Checks(tokenizer, resample=True)
    eight_khz = next(u for u in utterances if u.id == "174-50561-0003")
    assert resampling.problem(eight_khz, for_training=True) is None
    assert "8000 Hz" in found["174-50561-0003"].detail
    budget = Checks(tokenizer, max_batch_seconds=2.0)  # the 2.5 s clip fits in no training batch
    long = next(u for u in utterances if u.id == "84-121123-0001")
    assert budget.problem(long, for_training=True).reason == "longer than data.max_batch_seconds"
    assert budget.problem(long, for_training=False) is None


def test_policy_raises_with_the_file_or_counts(tmp_path):
    _, problems = scan_directory(write_corpus(tmp_path))
    assert apply_policy(problems, "skip") == problems
    assert Counter(p.reason for p in problems) == {"audio without transcript": 2, "empty transcript": 1,
                                                   "transcript without audio": 1, "unreadable audio": 1}
    with pytest.raises(DataError, match=r"2-3-0000\.flac: audio without transcript \(no line for 2-3-0000 "):
        apply_policy(problems, "raise")


def test_sources_and_split_names(tmp_path):
    assert parts("train-960") == ("train-clean-100", "train-clean-360", "train-other-500")
    assert parts("dev-clean") == ("dev-clean",)
    with pytest.raises(FileNotFoundError, match="test-other"):
        locate(tmp_path, "test-other")
    (tmp_path / "test-other.tar.gz").write_bytes(b"")
    assert locate(tmp_path, "test-other") == str(tmp_path / "test-other.tar.gz")
    (tmp_path / "LibriSpeech" / "test-other").mkdir(parents=True)
    assert locate(tmp_path, "test-other") == str(tmp_path / "LibriSpeech" / "test-other")
    url = locate(tmp_path, "test-other", "https://example.org/12/")
    assert url == "https://example.org/12/test-other.tar.gz"


def test_decoding_resamples_when_asked(tmp_path, tokenizer):
    utterances, _ = scan_directory(write_corpus(tmp_path))
    eight_khz = next(u for u in utterances if u.id == "174-50561-0003")
    audio = Checks(tokenizer, resample=True).decode(eight_khz, eight_khz.path)
    assert audio.shape == (16_000,) and audio.dtype == np.int16
    original, _ = sf.read(eight_khz.path, dtype="int16")
    assert abs(np.abs(audio).mean() / np.abs(original).mean() - 1) < 0.05  # the same signal, twice the samples
    truncated = next(u for u in utterances if u.id == "174-50561-0002")
    with pytest.raises(DataError, match=r"174-50561-0002\.flac: undecodable audio"):
        Checks(tokenizer).decode(truncated, truncated.path)


def test_a_batch_is_decoded_padded_and_leaves_out_what_fails(tmp_path, tokenizer):
    utterances, _ = scan_directory(write_corpus(tmp_path))
    by_id = {u.id: u for u in utterances}
    chosen = [by_id[i] for i in ("84-121123-0000", "174-50561-0002", "174-50561-0003", "84-121123-0001")]
    checks = Checks(tokenizer, resample=True)
    batch = checks.batch([(u, u.path) for u in chosen], on_error="skip", skipped=[("earlier", "x.flac")])
    assert batch["ids"] == ["84-121123-0000", "174-50561-0003", "84-121123-0001"]
    assert [reason for reason, _ in batch["skipped"]] == ["earlier", "undecodable audio"]
    assert batch["skipped"][1][1].endswith("174-50561-0002.flac")
    lengths = [checks.samples(by_id[i]) for i in batch["ids"]]
    assert lengths[1] == 16_000  # the 8 kHz clip, resampled
    assert batch["lengths"] == lengths
    assert batch["input_values"].shape == (3, max(lengths)) and batch["input_values"].dtype == torch.int16
    for k, (utt_id, n) in enumerate(zip(batch["ids"], lengths, strict=True)):
        alone = checks.decode(by_id[utt_id], by_id[utt_id].path)
        np.testing.assert_array_equal(batch["input_values"][k, :n].numpy(), alone)
        assert not batch["input_values"][k, n:].any()
        assert tokenizer.decode(batch["labels"][k]) == batch["texts"][k]
    with pytest.raises(DataError, match="174-50561-0002"):
        checks.batch([(u, u.path) for u in chosen], on_error="raise")


def test_model_inputs_normalise_each_utterance_over_its_own_samples():
    pcm = [torch.randint(-3000, 3000, (n,), dtype=torch.int16) + offset for n, offset in ((900, 500), (400, -20))]
    buffer = pcm_buffer([900, 400])
    for k, row in enumerate(pcm):
        buffer[k, : len(row)] = row
    inputs = model_inputs({"input_values": buffer, "lengths": [900, 400], "labels": [[5, 6], [7]]})
    assert inputs["attention_mask"].sum(1).tolist() == inputs["lengths"].tolist() == [900, 400]
    assert inputs["labels"].tolist() == [[5, 6], [7, -100]] and inputs["label_lengths"].tolist() == [2, 1]
    for k, row in enumerate(pcm):
        audio = row.double() / 32768
        expected = (audio - audio.mean()) / torch.sqrt(audio.var(unbiased=False) + 1e-7)
        torch.testing.assert_close(inputs["input_values"][k, : len(row)].double(), expected, atol=1e-5, rtol=1e-5)
    assert not inputs["input_values"][1, 400:].any()


def test_batches_from_a_worker_equal_batches_made_in_process(tmp_path, tokenizer):
    """A worker reuses its buffers from batch to batch: padding must still be zero after a batch of longer audio."""
    utterances, _ = scan_directory(write_corpus(tmp_path))
    by_id = {u.id: u for u in utterances}
    order = [["84-121123-0001", "174-50561-0000"], ["84-121123-0000", "174-50561-0006"]]
    dataset = SpeechDataset([by_id[i] for batch in order for i in batch], Checks(tokenizer))
    sampler = [[0, 1], [2, 3]]
    assert max(u.num_samples for u in dataset.utterances[2:]) < max(u.num_samples for u in dataset.utterances[:2])
    in_process = [dataset.batch(indices) for indices in sampler]
    loader = SpeechLoader(dataset, batch_sampler=sampler, collate_fn=lambda b: b, num_workers=1)
    for made, sent in zip(in_process, loader, strict=True):
        assert sent["ids"] == made["ids"] and sent["lengths"] == made["lengths"]
        torch.testing.assert_close(sent["input_values"], made["input_values"], rtol=0, atol=0)
        for k, n in enumerate(sent["lengths"]):
            assert not sent["input_values"][k, n:].any()
