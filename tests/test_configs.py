"""Every experiment composes and instantiates; the root defaults are the model card's recipe."""

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from asr.builders import build_datamodule, build_model, build_tokenizer, build_trainer
from asr.config import CONFIG_DIR, compose

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))
TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}


def compose_cfg(*overrides: str):
    cfg = compose("train", list(overrides), hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = "/tmp/asr-test-run"
    return cfg


def test_experiments_found():
    assert {"demo", "hubert_large_ls100h"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_instantiates(experiment, tiny_pretrained, tmp_path):
    from hydra.core.hydra_config import HydraConfig

    cfg = compose_cfg(f"experiment={experiment}", f"data.root={tmp_path}")
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        if cfg.model.pretrained:
            cfg.model.pretrained = str(tiny_pretrained)
        else:
            cfg.model.config.update(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    tokenizer = build_tokenizer()
    model = build_model(cfg, tokenizer)
    datamodule = build_datamodule(cfg, tokenizer, model.input_facts)
    optimizer = model.optimizer_factory(params=model.parameters())
    assert isinstance(optimizer, torch.optim.Optimizer)
    assert model.scheduler_factory(optimizer, total_steps=100).get_last_lr()[0] < optimizer.defaults["lr"]
    trainer = build_trainer(cfg)
    assert trainer.max_epochs == cfg.trainer.max_epochs
    assert datamodule.val_splits == model.splits["val"]


@pytest.mark.parametrize("name", MODELS)
def test_every_backbone_config_builds_offline(name):
    """Each conf/model/*.yaml builds (the pretrained ones as a random init of their architecture, no hub)."""
    from asr.backbones import random_init

    cfg = compose_cfg(f"model={name}")
    random_init(cfg.model)
    with open_dict(cfg):
        cfg.model.config.update(TINY)
    model = build_model(cfg, build_tokenizer())
    assert model.backbone.config.hidden_size == 32
    assert model.input_facts["min_samples"] >= 400


def test_a_backbone_is_added_with_a_config_file(tmp_path):
    """What the README's Extending section shows: a new conf/model/<name>.yaml, selected with model=<name>."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "my_wav2vec2.yaml").write_text(
        "defaults:\n  - hubert_tiny\n\nconfig:\n  model_type: wav2vec2\n  hidden_size: 32\n"
        "  num_hidden_layers: 1\n  num_attention_heads: 2\n  intermediate_size: 32\n"
    )
    cfg = compose_cfg("experiment=demo", "model=my_wav2vec2", f"hydra.searchpath=[file://{tmp_path}]")
    model = build_model(cfg, build_tokenizer())
    assert type(model.backbone).__name__ == "Wav2Vec2ForCTC"
    assert model.input_facts["min_samples"] == 485  # the demo's convolutions, inherited


def test_root_defaults_are_the_model_card_recipe():
    def plain(cfg):
        cfg = OmegaConf.to_container(cfg, resolve=False)
        cfg.pop("hydra")
        return cfg

    assert plain(compose_cfg()) == plain(compose_cfg("experiment=hubert_large_ls100h"))


def test_model_card_settings():
    cfg = compose_cfg("experiment=hubert_large_ls100h")
    assert cfg.seed == 42
    assert cfg.model.pretrained == "facebook/hubert-large-ll60k"
    assert cfg.model.freeze_feature_encoder is True
    assert cfg.model.config.layerdrop == 0.0
    assert (cfg.optimizer.lr, list(cfg.optimizer.betas), cfg.optimizer.eps) == (3e-4, [0.9, 0.999], 1e-8)
    assert cfg.scheduler.warmup_steps == 500 and cfg.scheduler.decay == "linear"
    assert cfg.trainer.max_epochs == 3 and cfg.trainer.precision == "16-mixed"
    assert (cfg.data.batch_size, cfg.data.eval_batch_size) == (4, 8)
    assert list(cfg.data.train_splits) == ["train-clean-100"]
    assert list(cfg.data.val_splits) == ["dev-clean"]
    assert list(cfg.data.test_splits) == ["test-clean", "test-other"]
