"""Greedy-decoding WER/CER per test split, and its speed: ``python -m asr.evaluate [overrides]``.

The model comes from ``ckpt_path=`` (a Lightning checkpoint written by ``asr.train``; its architecture is read
from the checkpoint, so no hub access is needed) or from ``model.pretrained=`` (a folder saved with
``save_pretrained``, or a hub id) with ``model.config`` as overrides. The speed switches of ``model.*``
(``packed``, ``compile``, ``attn_implementation``) and ``trainer.precision`` apply as given on the command
line. Data, batching and splits are the training config's (``data.test_splits``, or ``evaluate.splits``).

Prints and writes ``evaluate.json`` in the run folder: per split WER, CER, CTC loss, utterances and audio
hours; the mean WER/CER over the splits; audio-seconds decoded per second over the whole test loop and after
the first ``evaluate.warmup_batches`` batches (timed between ``torch.cuda.synchronize()`` calls).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from asr.backbones import random_init
from asr.builders import build_callbacks, build_datamodule, build_decoder, build_model, build_tokenizer, build_trainer
from asr.checkpoint import load_recognizer
from asr.data.text import CharTokenizer
from asr.model import SpeechRecognizer

log = logging.getLogger(__name__)


class EvalMeter(Callback):
    """Audio decoded (counted on the device) and wall time of the test loop, all of it and after warm-up."""

    def __init__(self, warmup_batches: int = 1) -> None:
        self.warmup_batches = warmup_batches
        self.sample_rate = 0
        self.batches = 0
        self.utterances = 0
        self.audio = self.audio_after = None
        self.t0 = self.t_warm = self.t1 = None

    def _sync(self, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_test_start(self, trainer, pl_module) -> None:
        self.sample_rate = pl_module.hparams.sample_rate
        self.audio = torch.zeros((), dtype=torch.long, device=pl_module.device)
        self.audio_after = torch.zeros_like(self.audio)
        self._sync(pl_module)
        self.t0 = time.perf_counter()

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        samples = batch["attention_mask"].sum()
        self.audio += samples
        if self.batches >= self.warmup_batches:
            self.audio_after += samples
        self.utterances += len(batch["ids"])

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.batches += 1
        if self.batches == self.warmup_batches:
            self._sync(pl_module)
            self.t_warm = time.perf_counter()

    def on_test_end(self, trainer, pl_module) -> None:
        self._sync(pl_module)
        self.t1 = time.perf_counter()

    def result(self) -> dict:
        audio = float(self.audio) / self.sample_rate
        out = {
            "audio_seconds": audio,
            "utterances": self.utterances,
            "batches": self.batches,
            "seconds": self.t1 - self.t0,
            "audio_seconds_per_second": audio / (self.t1 - self.t0),
        }
        if self.t_warm is not None and self.t1 > self.t_warm and self.batches > self.warmup_batches:
            out["audio_seconds_per_second_after_warmup"] = (
                float(self.audio_after) / self.sample_rate / (self.t1 - self.t_warm)
            )
        return out


def load_model(cfg: DictConfig, tokenizer: CharTokenizer, splits: list[str]) -> SpeechRecognizer:
    """The model of ``ckpt_path`` (architecture and weights from the checkpoint) or of ``cfg.model``."""
    if not cfg.get("ckpt_path"):
        return build_model(cfg, tokenizer, optimizer=None, val_splits=[], test_splits=splits)
    runtime = OmegaConf.to_container(cfg.model, resolve=True)
    return load_recognizer(
        cfg.ckpt_path, tokenizer, build_decoder(cfg, tokenizer), runtime, val_splits=[], test_splits=splits
    )


def evaluate(cfg: DictConfig) -> dict:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    splits = list(cfg.evaluate.splits or cfg.data.test_splits)
    with open_dict(cfg):
        # Only the decoded splits need to exist: the others are pointed at them too.
        cfg.data.train_splits = cfg.data.val_splits = cfg.data.test_splits = splits
        if not torch.cuda.is_available() and str(cfg.trainer.precision).startswith("16"):
            cfg.trainer.precision = "32-true"  # no fp16 autocast on CPU
    if cfg.evaluate.random_init and not cfg.get("ckpt_path"):
        random_init(cfg.model)
    L.seed_everything(cfg.seed, workers=True)
    tokenizer = build_tokenizer()
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = load_model(cfg, tokenizer, splits)
    datamodule = build_datamodule(cfg, tokenizer, model.input_facts)
    meter = EvalMeter(cfg.evaluate.warmup_batches)
    callbacks = [meter, *(build_callbacks(cfg, only=("progress",)) if cfg.evaluate.progress_bar else [])]
    trainer = build_trainer(
        cfg,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=len(callbacks) > 1,
        fast_dev_run=False,
        default_root_dir=str(run_dir),
    )
    trainer.test(model, datamodule=datamodule)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    report = {
        "model": str(cfg.ckpt_path or cfg.model.get("pretrained") or "random init"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "precision": str(cfg.trainer.precision),
        "splits": {
            split: {
                name: metrics[f"test/{split}/{name}"]
                for name in ("wer", "cer", "loss")
                if f"test/{split}/{name}" in metrics
            }
            for split in splits
        },
        "wer": metrics.get("test/wer"),
        "cer": metrics.get("test/cer"),
        **meter.result(),
    }
    path = run_dir / "evaluate.json"
    path.write_text(json.dumps(report, indent=1))
    for split, values in report["splits"].items():
        wer, cer = values.get("wer", float("nan")), values.get("cer", float("nan"))
        print(f"{split:<16} WER {wer:.4f}  CER {cer:.4f}")
    print(
        f"{report['audio_seconds']:.0f} s of audio in {report['seconds']:.1f} s: "
        f"{report['audio_seconds_per_second']:.0f} audio-seconds per second"
    )
    print(json.dumps(report, indent=1))
    log.info("Results: %s", path)
    return report


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
