"""Synthetic durations with LibriSpeech's profile."""

import numpy as np
import pytest

from asr.data.synthetic import train_clean_100_durations


def test_durations_follow_train_clean_100():
    durations = train_clean_100_durations(50_000, np.random.default_rng(0))
    assert durations.mean() == pytest.approx(12.7, abs=0.15)
    assert 1.3 <= durations.min() and durations.max() <= 24.5
    assert ((durations >= 10) & (durations <= 16.5)).mean() == pytest.approx(0.8, abs=0.03)
