"""Backbones: the facts the data needs come from the encoder's own convolutions; random init needs no hub."""

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForCTC

from asr.backbones import ARCHITECTURES, encoder_facts, input_facts, random_init
from asr.config import compose
from tests.helpers import TINY_HUBERT


def conv_only(architecture: dict) -> dict:
    keep = ("model_type", "conv_dim", "conv_kernel", "conv_stride")
    return {k: architecture[k] for k in keep} | {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "num_conv_pos_embeddings": 16,
        "num_conv_pos_embedding_groups": 4,
        "conv_dim": [8] * len(architecture["conv_kernel"]),
    }


@pytest.mark.parametrize(
    "architecture",
    [TINY_HUBERT, compose("train", ["experiment=demo"]).model.config, ARCHITECTURES["facebook/hubert-large-ll60k"]],
    ids=["tiny", "demo", "large"],
)
def test_receptive_field_and_frame_rate_match_the_encoder(architecture):
    architecture = OmegaConf.to_container(architecture) if not isinstance(architecture, dict) else architecture
    config = dict(conv_only(architecture))
    model = AutoModelForCTC.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
    facts = input_facts(model.config, 16_000)
    frames = model._get_feat_extract_output_lengths
    assert int(frames(torch.tensor(facts["min_samples"]))) == 1
    assert int(frames(torch.tensor(facts["min_samples"] - 1))) == 0
    ten_seconds = int(frames(torch.tensor(160_000)))
    assert ten_seconds == pytest.approx(10 * facts["frames_per_second"], abs=1)
    with torch.no_grad():  # the convolutions themselves agree
        encoder = model.base_model.feature_extractor
        assert encoder(torch.randn(1, facts["min_samples"])).shape[-1] == 1
        assert encoder(torch.randn(1, 160_000)).shape[-1] == ten_seconds


def test_facts_of_the_configs_without_the_hub():
    assert encoder_facts(compose("train").model) == {
        "sample_rate": 16_000,
        "min_samples": 400,
        "frames_per_second": 50.0,
    }
    demo = encoder_facts(compose("train", ["experiment=demo"]).model)
    assert demo == {"sample_rate": 16_000, "min_samples": 485, "frames_per_second": pytest.approx(16_000 / 480)}


def test_random_init_takes_the_architecture_of_the_pretrained_id():
    model_cfg = compose("train", ["model=wavlm_large"]).model
    assert random_init(model_cfg) == "microsoft/wavlm-large"
    assert model_cfg.pretrained is None
    assert model_cfg.config.model_type == "wavlm" and model_cfg.config.num_hidden_layers == 24
    assert model_cfg.config.layerdrop == 0.0  # the config's own overrides stay on top
