"""The installed torch and torchaudio are a pair that loads together: torchaudio's compiled operators run."""

import torch


def test_torchaudio_operators_load_with_this_torch():
    try:
        import torchaudio
        import torchaudio.functional as AF
    except OSError as err:  # e.g. "libtorchaudio.so: undefined symbol": a torchaudio built for another torch
        raise AssertionError(f"torchaudio does not load with torch {torch.__version__}: {err}") from err
    tone = torch.sin(torch.arange(16_000) / 16_000 * 2 * torch.pi * 440)[None]
    resampled = AF.resample(tone, 16_000, 8_000)
    assert resampled.shape == (1, 8_000), f"torchaudio {torchaudio.__version__} with torch {torch.__version__}"
    # The energy of a 440 Hz tone survives resampling to 8 kHz.
    assert abs(resampled.square().mean().item() - tone.square().mean().item()) < 0.01
