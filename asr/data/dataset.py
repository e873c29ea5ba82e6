"""Utterances to model inputs: decoded, normalised audio and label ids, and their padded batches."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import Dataset

from asr.data.librispeech import SAMPLE_RATE, DataError, Utterance
from asr.data.text import CharTokenizer, normalize


class SpeechDataset(Dataset):
    def __init__(self, utterances: Sequence[Utterance], tokenizer: CharTokenizer, sample_rate: int = SAMPLE_RATE):
        self.utterances = list(utterances)
        self.tokenizer = tokenizer
        self.sample_rate = sample_rate

    def __len__(self) -> int:
        return len(self.utterances)

    def __getitem__(self, index: int) -> dict:
        utt = self.utterances[index]
        try:
            audio, rate = sf.read(utt.path, dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as err:
            raise DataError(f"{utt.path}: cannot decode audio ({err})") from err
        if rate != self.sample_rate:
            raise DataError(f"{utt.path}: sample rate {rate} Hz, expected {self.sample_rate} Hz")
        audio = audio.mean(axis=1)
        # Zero mean, unit variance per utterance, as Wav2Vec2FeatureExtractor(do_normalize=True) does.
        audio = (audio - audio.mean()) / np.sqrt(audio.var() + 1e-7)
        text = normalize(utt.transcript)
        return {
            "id": utt.id,
            "audio": torch.from_numpy(audio),
            "labels": torch.tensor(self.tokenizer.encode(text), dtype=torch.long),
            "text": text,
        }


def collate(items: list[dict]) -> dict:
    """Zero-pad audio (with an attention mask) and pad labels with -100, the ignore index of transformers."""
    audio_lengths = torch.tensor([len(item["audio"]) for item in items])
    label_lengths = torch.tensor([len(item["labels"]) for item in items])
    audio = torch.zeros(len(items), int(audio_lengths.max()))
    labels = torch.full((len(items), int(label_lengths.max())), -100, dtype=torch.long)
    for k, item in enumerate(items):
        audio[k, : audio_lengths[k]] = item["audio"]
        labels[k, : label_lengths[k]] = item["labels"]
    return {
        "input_values": audio,
        "attention_mask": torch.arange(audio.shape[1])[None, :] < audio_lengths[:, None],
        "labels": labels,
        "label_lengths": label_lengths,
        "texts": [item["text"] for item in items],
        "ids": [item["id"] for item in items],
    }
