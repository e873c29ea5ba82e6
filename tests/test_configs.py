"""Every experiment composes and instantiates; the root defaults are the model card's recipe."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

import asr.train
from asr.data.text import CharTokenizer

CONF = Path(asr.train.__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def compose_cfg(*overrides: str):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
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
    tokenizer = CharTokenizer()
    datamodule = instantiate(cfg.data, tokenizer=tokenizer, _convert_="all")
    model = instantiate(cfg.model, tokenizer=tokenizer, optimizer=instantiate(cfg.optimizer),
                        scheduler=instantiate(cfg.scheduler), _convert_="all")
    optimizer = model.optimizer_factory(params=model.parameters())
    assert isinstance(optimizer, torch.optim.Optimizer)
    assert model.scheduler_factory(optimizer, total_steps=100).get_last_lr()[0] < optimizer.defaults["lr"]
    trainer = instantiate(cfg.trainer, callbacks=[instantiate(c) for c in cfg.callbacks.values()],
                          logger=instantiate(cfg.logger))
    assert trainer.max_epochs == cfg.trainer.max_epochs
    assert datamodule.val_splits == model.splits["val"]


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


def test_sweep_folders_are_named_after_overrides():
    from hydra.core.hydra_config import HydraConfig

    cfg = compose_cfg("optimizer.lr=1e-4", "trainer.devices=8")
    HydraConfig.instance().set_config(cfg)
    assert cfg.hydra.sweep.subdir == "optimizer.lr=1e-4"
