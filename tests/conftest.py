from __future__ import annotations

from pathlib import Path

import pytest
import soundfile as sf
import torch

from asr.data.dataset import model_inputs, pcm_buffer
from asr.data.demo import DemoCorpusConfig, build_demo_corpus
from asr.data.text import CharTokenizer

TINY_HUBERT = {
    "model_type": "hubert",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "conv_dim": [16, 16],
    "conv_kernel": [10, 4],
    "conv_stride": [5, 4],
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 4,
}


@pytest.fixture(scope="session")
def tokenizer() -> CharTokenizer:
    return CharTokenizer()


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """A small demo corpus (about 3 minutes of training audio), built once per test session."""
    root = tmp_path_factory.mktemp("demo")
    build_demo_corpus(root, DemoCorpusConfig(train_hours=0.05, dev_utterances=16, test_utterances=16))
    return root


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory, tokenizer) -> Path:
    """A random-init HuBERT-CTC saved with save_pretrained, standing in for a hub checkpoint."""
    from transformers import AutoConfig, AutoModelForCTC

    folder = tmp_path_factory.mktemp("tiny-hubert")
    config = AutoConfig.for_model(**{**TINY_HUBERT, "feat_extract_norm": "layer", "do_stable_layer_norm": True})
    AutoModelForCTC.from_config(config).save_pretrained(folder)
    return folder


def write_flac(path: Path, seconds: float, rate: int = 16_000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, (0.1 * torch.randn(int(seconds * rate))).numpy(), rate, format="FLAC")


def batch_of(audios: list[torch.Tensor], labels: list[list[int]]) -> dict:
    """A model batch of in-memory audio (floats in [-1, 1)), made as the data path makes it from FLAC."""
    pcm = pcm_buffer([len(a) for a in audios])
    for k, audio in enumerate(audios):
        pcm[k, : len(audio)] = (audio.clamp(-1, 1 - 2**-15) * 32768).round().to(torch.int16)
    return model_inputs({"input_values": pcm, "lengths": [len(a) for a in audios], "labels": labels})
