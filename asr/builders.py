"""The one place that builds the run's objects from its config; the entry points compose a config and call these."""

from __future__ import annotations

from typing import TYPE_CHECKING

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from asr.backbones import encoder_facts
from asr.data.augment import AdditiveNoise, Augmentation, Reverb, SpeedPerturbation
from asr.data.text import CharTokenizer
from asr.decoding import Decoder

if TYPE_CHECKING:
    from asr.data.datamodule import SpeechDataModule
    from asr.model import SpeechRecognizer


def build_tokenizer() -> CharTokenizer:
    return CharTokenizer()


def build_decoder(cfg: DictConfig, tokenizer: CharTokenizer) -> Decoder:
    return instantiate(cfg.decoder, tokenizer=tokenizer)


def build_datamodule(
    cfg: DictConfig, tokenizer: CharTokenizer | None = None, input_facts: dict | None = None
) -> SpeechDataModule:
    """The DataModule of ``cfg.data``, told the model's sample rate, receptive field and frame rate: those of a
    built model (``model.input_facts``) where there is one, else read from ``cfg.model``; with the waveform
    augmentation of ``cfg.augment``."""
    facts = input_facts or encoder_facts(cfg.model)
    augment = build_augmentation(cfg, facts["sample_rate"])
    return instantiate(cfg.data, tokenizer=tokenizer or build_tokenizer(), **facts, augment=augment, _convert_="all")


def build_augmentation(cfg: DictConfig, sample_rate: int) -> Augmentation | None:
    """The waveform transforms of ``cfg.augment`` (None without any): their audio folders read at the model's
    ``sample_rate``, a bad file in them skipped or raised as ``data.on_error`` says. (``augment.specaugment`` is the
    model's: conf/model/*.yaml read it.)"""
    augment = cfg.get("augment") or {}
    files = {"sample_rate": sample_rate, "on_error": cfg.data.get("on_error", "skip")}

    def settings(name: str) -> dict | None:
        node = augment.get(name)
        return None if node is None else OmegaConf.to_container(node, resolve=True)

    speed, reverb, noise = settings("speed"), settings("reverb"), settings("noise")
    if speed is None and reverb is None and noise is None:
        return None
    return Augmentation(
        speed=None if speed is None else SpeedPerturbation(**speed),
        reverb=None if reverb is None else Reverb(**reverb, **files),
        noise=None if noise is None else AdditiveNoise(**noise, **files),
    )


def build_model(cfg: DictConfig, tokenizer: CharTokenizer, **overrides) -> SpeechRecognizer:
    """The LightningModule of ``cfg.model``, with the optimizer, schedule and decoder of the config."""
    parts = {
        "tokenizer": tokenizer,
        "decoder": build_decoder(cfg, tokenizer),
        "optimizer": instantiate(cfg.optimizer),
        "scheduler": instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
    }
    return instantiate(cfg.model, **{**parts, **overrides}, _convert_="all")


def build_callbacks(cfg: DictConfig, only: tuple[str, ...] | None = None) -> list[L.Callback]:
    """The callbacks of ``cfg.callbacks`` (those named in ``only``, when given)."""
    return [instantiate(c) for name, c in (cfg.get("callbacks") or {}).items() if only is None or name in only]


def build_logger(cfg: DictConfig, **overrides):
    return instantiate(cfg.logger, **overrides) if cfg.get("logger") else False


def build_trainer(cfg: DictConfig, callbacks: list[L.Callback] | None = None, logger=None, **overrides) -> L.Trainer:
    """A Trainer of ``cfg.trainer``; the callbacks and logger of the config unless given, then ``overrides``."""
    callbacks = build_callbacks(cfg) if callbacks is None else callbacks
    logger = build_logger(cfg) if logger is None else logger
    return instantiate(cfg.trainer, callbacks=callbacks, logger=logger, **overrides)
