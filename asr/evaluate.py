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

import inspect
import json
import logging
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from asr.data.librispeech import SAMPLE_RATE
from asr.data.text import CharTokenizer
from asr.model import SpeechRecognizer, architecture_overrides

log = logging.getLogger(__name__)

# Settings of how to run, not of what was trained: taken from the command line's config, not the checkpoint.
RUNTIME_KEYS = ("attn_implementation", "packed", "compile", "compile_options", "device_specaugment")


class EvalMeter(Callback):
    """Audio decoded (counted on the device) and wall time of the test loop, all of it and after warm-up."""

    def __init__(self, warmup_batches: int = 1) -> None:
        self.warmup_batches = warmup_batches
        self.batches = 0
        self.utterances = 0
        self.audio = self.audio_after = None
        self.t0 = self.t_warm = self.t1 = None

    def _sync(self, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_test_start(self, trainer, pl_module) -> None:
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
        audio = float(self.audio) / SAMPLE_RATE
        out = {
            "audio_seconds": audio, "utterances": self.utterances, "batches": self.batches,
            "seconds": self.t1 - self.t0, "audio_seconds_per_second": audio / (self.t1 - self.t0),
        }
        if self.t_warm is not None and self.t1 > self.t_warm and self.batches > self.warmup_batches:
            out["audio_seconds_per_second_after_warmup"] = float(self.audio_after) / SAMPLE_RATE / (
                self.t1 - self.t_warm)
        return out


def load_model(cfg: DictConfig, tokenizer: CharTokenizer, splits: list[str]) -> SpeechRecognizer:
    """The model of ``ckpt_path`` (architecture and weights from the checkpoint) or of ``cfg.model``."""
    runtime = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k in RUNTIME_KEYS}
    common = {"tokenizer": tokenizer, "optimizer": None, "val_splits": [], "test_splits": splits}
    if not cfg.get("ckpt_path"):
        return instantiate(cfg.model, **common, _convert_="all")
    path = Path(cfg.ckpt_path).expanduser()
    if not path.is_file():
        raise SystemExit(f"ckpt_path={cfg.ckpt_path}: no such file")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    accepted = inspect.signature(SpeechRecognizer.__init__).parameters
    hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if k in accepted}
    if "backbone_config" in checkpoint:
        hparams["pretrained"] = None
        hparams["config"] = architecture_overrides(checkpoint["backbone_config"])
    model = SpeechRecognizer(**{**hparams, **runtime, **common})
    model.load_state_dict(checkpoint["state_dict"])
    log.info("Loaded %s (global step %s)", path, checkpoint.get("global_step"))
    return model


def evaluate(cfg: DictConfig) -> dict:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    splits = list(cfg.evaluate.splits or cfg.data.test_splits)
    with open_dict(cfg):
        # Only the decoded splits need to exist: the others are pointed at them too.
        cfg.data.train_splits = cfg.data.val_splits = cfg.data.test_splits = splits
        if not torch.cuda.is_available() and str(cfg.trainer.precision).startswith("16"):
            cfg.trainer.precision = "32-true"  # no fp16 autocast on CPU
    if cfg.evaluate.random_init and not cfg.get("ckpt_path"):
        from asr.bench import random_init

        random_init(cfg.model)
    L.seed_everything(cfg.seed, workers=True)
    tokenizer = CharTokenizer()
    datamodule = instantiate(cfg.data, tokenizer=tokenizer, _convert_="all")
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = load_model(cfg, tokenizer, splits)
    meter = EvalMeter(cfg.evaluate.warmup_batches)
    callbacks = [meter]
    if cfg.evaluate.progress_bar and (cfg.get("callbacks") or {}).get("progress"):
        callbacks.append(instantiate(cfg.callbacks.progress))
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=len(callbacks) > 1, fast_dev_run=False,
        default_root_dir=str(run_dir),
    )
    trainer.test(model, datamodule=datamodule)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    report = {
        "model": str(cfg.ckpt_path or cfg.model.get("pretrained") or "random init"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "precision": str(cfg.trainer.precision),
        "splits": {
            split: {name: metrics[f"test/{split}/{name}"] for name in ("wer", "cer", "loss")
                    if f"test/{split}/{name}" in metrics}
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
    print(f"{report['audio_seconds']:.0f} s of audio in {report['seconds']:.1f} s: "
          f"{report['audio_seconds_per_second']:.0f} audio-seconds per second")
    print(json.dumps(report, indent=1))
    log.info("Results: %s", path)
    return report


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
