"""The checks that make an utterance usable, and decoding utterances into padded batches."""

import numpy as np
import pytest
import soundfile as sf
import torch

from asr.data.checks import Checks
from asr.data.librispeech import DataError, Problem, Utterance, scan_directory
from tests.helpers import CHECK_PROBLEMS, write_corpus


def test_checks_name_the_reason(tmp_path, tokenizer):
    utterances, _ = scan_directory(write_corpus(tmp_path))
    checks = Checks(tokenizer)
    found = {u.id: checks.problem(u, for_training=True) for u in utterances}
    assert {i: p.reason for i, p in found.items() if p} == {
        **CHECK_PROBLEMS,
        "174-50561-0006": "label longer than the output frames",
    }
    assert checks.problem(next(u for u in utterances if u.id == "174-50561-0006"), for_training=False) is None
    resampling = Checks(tokenizer, resample=True)
    eight_khz = next(u for u in utterances if u.id == "174-50561-0003")
    assert resampling.problem(eight_khz, for_training=True) is None
    assert "8000 Hz" in found["174-50561-0003"].detail
    budget = Checks(tokenizer, max_batch_seconds=2.0)  # the 2.5 s clip fits in no training batch
    long = next(u for u in utterances if u.id == "84-121123-0001")
    assert budget.problem(long, for_training=True).reason == "longer than data.max_batch_seconds"
    assert budget.problem(long, for_training=False) is None


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
    earlier = Problem("earlier", "x.flac", "")
    batch = checks.batch([(u, u.path) for u in chosen], on_error="skip", skipped=[earlier])
    assert batch["ids"] == ["84-121123-0000", "174-50561-0003", "84-121123-0001"]
    assert [p.reason for p in batch["skipped"]] == ["earlier", "undecodable audio"]
    assert batch["skipped"][1].where.endswith("174-50561-0002.flac") and batch["skipped"][1].detail
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


@pytest.mark.parametrize("text, labels", [("LL", 2), ("HELLO", 5), ("A BOOK", 6)])
def test_ctc_needs_a_blank_between_repeated_letters_exactly_at_the_edge(tokenizer, text, labels):
    """The HuBERT CNN gives frame k for samples [320k, 320k + 400): N frames from 400 + 320 (N - 1) samples. A label
    needs a frame per letter and a blank between each pair of repeated letters ("LL": 3 frames, not 2)."""
    needed = labels + 1  # each of these has one repeat: LL, LL, OO
    checks = Checks(tokenizer)

    def utterance(samples: int) -> Utterance:
        return Utterance("1-2-3", "x.flac", text, "1", samples, 16_000)

    fits = 400 + 320 * (needed - 1)
    assert checks.problem(utterance(fits), for_training=True) is None
    problem = checks.problem(utterance(fits - 1), for_training=True)
    assert problem.reason == "label longer than the output frames"
    assert problem.detail.startswith(f"{needed} CTC frames needed, {needed - 1} in")
