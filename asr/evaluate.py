"""WER/CER per test split, with error counts, word confusions and per-utterance predictions, and decoding speed:
``python -m asr.evaluate [overrides]``.

The model comes from ``ckpt_path=`` (a Lightning checkpoint written by ``asr.train``; its architecture is read
from the checkpoint, so no hub access is needed) or from ``model.pretrained=`` (a folder saved with
``save_pretrained``, or a hub id) with ``model.config`` as overrides. The speed switches of ``model.*``
(``packed``, ``compile``, ``attn_implementation``) and ``trainer.precision`` apply as given on the command
line. Data, batching and splits are the training config's (``data.test_splits``, or ``evaluate.splits``).

Writes, in the run folder, ``predictions.jsonl`` (a line per utterance: split, id, reference, hypothesis, reference
words, substitutions, deletions, insertions, seconds) and ``evaluate.json``: per split WER, CER, CTC loss (as the
model logs them, so the run's own checkpoint gives the run's test metrics), words, substitutions, deletions,
insertions, utterances, audio seconds and the most frequent confusions (``evaluate.top_confusions``); the mean
WER/CER over the splits; the confusions over all splits; audio-seconds decoded per second over the whole test loop
and after the first ``evaluate.warmup_batches`` batches (timed between ``torch.cuda.synchronize()`` calls).
Under DDP each utterance is decoded by one rank; rank 0 gathers them all, checks that each came once and that the
counts give the logged WER, and writes.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
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
from asr.scoring import score_predictions

log = logging.getLogger(__name__)

# The fields of a line of predictions.jsonl, in order.
FIELDS = ("split", "id", "reference", "hypothesis", "words", "substitutions", "deletions", "insertions", "seconds")


class EvalMeter(Callback):
    """Audio and utterances decoded (over all ranks; audio counted on the device) and wall time of the test loop,
    all of it and after warm-up."""

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
        reduce = trainer.strategy.reduce
        self.audio, self.audio_after = reduce(self.audio, reduce_op="sum"), reduce(self.audio_after, reduce_op="sum")
        utterances = torch.tensor(self.utterances, device=pl_module.device)
        self.utterances = int(reduce(utterances, reduce_op="sum"))

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


class Predictions(Callback):
    """The split, id, reference, hypothesis and audio seconds of each utterance decoded; when the test ends, those
    of all ranks on every rank."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        split, rate = pl_module.splits["test"][dataloader_idx], pl_module.hparams.sample_rate
        utterances = zip(batch["ids"], batch["texts"], outputs, batch["lengths"].tolist(), strict=True)
        self.rows += [
            {"split": split, "id": utt_id, "reference": ref, "hypothesis": hyp, "seconds": samples / rate}
            for utt_id, ref, hyp, samples in utterances
        ]

    def on_test_end(self, trainer, pl_module) -> None:
        if trainer.world_size > 1:
            parts = [None] * trainer.world_size
            torch.distributed.all_gather_object(parts, self.rows)
            self.rows = [row for part in parts for row in part]


def check_complete(rows: list[dict], decoded: int, scores: dict, metrics: dict) -> None:
    """Every utterance decoded is in ``rows`` once, and their word counts give the WER the model logged."""
    twice = [key for key, n in Counter((row["split"], row["id"]) for row in rows).items() if n > 1]
    if twice or len(rows) != decoded:
        repeated = f", {len(twice)} of them more than once (e.g. {twice[:3]})" if twice else ""
        raise RuntimeError(f"{decoded} utterances decoded but {len(rows)} predictions gathered{repeated}")
    for split, score in scores.items():
        counts, logged = score["counts"], metrics.get(f"test/{split}/wer")
        if counts.words and logged is not None and not math.isclose(counts.wer, logged, rel_tol=1e-6):
            raise RuntimeError(f"{split}: the predictions' word errors give WER {counts.wer}, the model's {logged}")


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
    meter, predictions = EvalMeter(cfg.evaluate.warmup_batches), Predictions()
    progress = build_callbacks(cfg, only=("progress",)) if cfg.evaluate.progress_bar else []
    trainer = build_trainer(
        cfg,
        callbacks=[meter, predictions, *progress],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=bool(progress),
        fast_dev_run=False,
        default_root_dir=str(run_dir),
    )
    trainer.test(model, datamodule=datamodule, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    rows = sorted(predictions.rows, key=lambda row: (splits.index(row["split"]), row["id"]))
    scores = score_predictions(rows, splits, cfg.evaluate.top_confusions)
    check_complete(rows, meter.utterances, {split: scores[split] for split in splits}, metrics)
    report = {
        "model": str(cfg.ckpt_path or cfg.model.get("pretrained") or "random init"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "precision": str(cfg.trainer.precision),
        "splits": {split: split_report(split, metrics, scores[split], rows) for split in splits},
        "wer": metrics.get("test/wer"),
        "cer": metrics.get("test/cer"),
        "confusions": scores["all"]["confusions"],
        "predictions": str(run_dir / "predictions.jsonl"),
        **meter.result(),
    }
    if trainer.is_global_zero:
        with open(report["predictions"], "w") as f:
            f.writelines(json.dumps({k: row[k] for k in FIELDS}) + "\n" for row in rows)
        path = run_dir / "evaluate.json"
        path.write_text(json.dumps(report, indent=1))
        print_report(report)
        print(f"Predictions: {report['predictions']}\nResults: {path}")
    return report


def split_report(split: str, metrics: dict, score: dict, rows: list[dict]) -> dict:
    """The split's logged metrics (WER, CER, loss), word counts, utterances, audio and confusions."""
    counts = score["counts"]
    logged = {name: metrics.get(f"test/{split}/{name}") for name in ("wer", "cer", "loss")}
    return {
        **{name: value for name, value in logged.items() if value is not None},
        "words": counts.words,
        "substitutions": counts.substitutions,
        "deletions": counts.deletions,
        "insertions": counts.insertions,
        "utterances": sum(row["split"] == split for row in rows),
        "audio_seconds": sum(row["seconds"] for row in rows if row["split"] == split),
        "confusions": score["confusions"],
    }


def short(word: str, width: int = 24) -> str:
    return word if len(word) <= width else word[: width - 1] + "…"


def print_report(report: dict, shown: int = 10) -> None:
    """The error rates and counts per split, the ``shown`` most frequent confusions over all splits, the speed."""
    nan = float("nan")
    print(f"{'split':<16}{'WER':>8}{'subs':>8}{'dels':>8}{'ins':>8}{'words':>9}{'CER':>8}{'utts':>7}{'hours':>8}")
    for split, v in report["splits"].items():
        print(
            f"{split:<16}{v.get('wer', nan):8.4f}{v['substitutions']:8d}{v['deletions']:8d}{v['insertions']:8d}"
            f"{v['words']:9d}{v.get('cer', nan):8.4f}{v['utterances']:7d}{v['audio_seconds'] / 3600:8.2f}"
        )
    if len(report["splits"]) > 1:
        wer, cer = (nan if report[name] is None else report[name] for name in ("wer", "cer"))
        print(f"{'mean':<16}{wer:8.4f}{'':33}{cer:8.4f}")
    confusions = report["confusions"]
    lines = {
        "substitutions (reference -> hypothesis)": [
            f"{short(c['reference'])} -> {short(c['hypothesis'])} {c['count']}"
            for c in confusions["substitutions"][:shown]
        ],
        "deletions": [f"{short(c['word'])} {c['count']}" for c in confusions["deletions"][:shown]],
        "insertions": [f"{short(c['word'])} {c['count']}" for c in confusions["insertions"][:shown]],
    }
    for kind, items in lines.items():
        print(f"Most frequent {kind}: {', '.join(items) or 'none'}")
    print(
        f"{report['audio_seconds']:.0f} s of audio in {report['seconds']:.1f} s: "
        f"{report['audio_seconds_per_second']:.0f} audio-seconds per second"
    )


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    """Returns the mean WER over the decoded splits to sweepers (conf/evaluate_lm_sweep.yaml)."""
    return evaluate(cfg).get("wer")


if __name__ == "__main__":
    main()
