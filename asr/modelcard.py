"""The model card (README.md) of an exported model, in the format of the cards transformers' Trainer writes, filled
from the run's own files: the checkpoint sits in ``<run>/checkpoints/``, next to ``<run>/.hydra/config.yaml``, the CSV
logs ``<run>/csv/version_*/metrics.csv`` and ``<run>/metrics.json``."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import lightning
import torch
import torchaudio
import transformers
import yaml
from omegaconf import DictConfig, OmegaConf
from transformers.modelcard import make_markdown_table

from asr.checkpoint import TrainedModel
from asr.data.download import MD5
from asr.data.librispeech import parts

USAGE = """```python
from transformers import pipeline

asr = pipeline("automatic-speech-recognition", model="{path}")
asr({{"raw": audio, "sampling_rate": 16_000}})  # or asr("file.flac"), which needs ffmpeg
```"""


def model_card(ckpt_path: str | Path, model: TrainedModel, name: str) -> str:
    """The card of ``model``, exported from ``ckpt_path`` as ``name``."""
    ckpt_path = Path(ckpt_path).resolve()
    run = ckpt_path.parent.parent
    cfg = _config(run)
    rows, no_rows = training_results(run)
    no_config = f"More information needed (the run's config, {run}/.hydra/config.yaml, was not found)"
    splits = {role: _names(_get(cfg, f"data.{role}_splits")) for role in ("train", "val", "test")}
    data = f"Training: {splits['train']}; validation: {splits['val']}; test: {splits['test']}."
    recipe = "\n".join(f"- {key}: {value}" for key, value in hyperparameters(cfg).items()) if cfg else ""
    sections = [
        _summary(cfg, name, rows, _test_metrics(run, ckpt_path), splits["train"]),
        "## Model description",
        _description(model, ckpt_path.name, name),
        "## Intended uses & limitations",
        "More information needed",
        "## Training and evaluation data",
        no_config if cfg is None else data,
        "## Training procedure",
        "### Training hyperparameters",
        no_config if cfg is None else f"The following hyperparameters were used during training:\n{recipe}",
        "### Training results",
        make_markdown_table(rows).rstrip("\n") if rows else f"No training logs: {no_rows}.",
        "### Framework versions",
        f"- Transformers {transformers.__version__}\n- Pytorch {torch.__version__}\n"
        f"- Torchaudio {torchaudio.__version__}\n- Lightning {lightning.__version__}",
    ]
    return "\n\n".join(sections) + "\n"


def _summary(cfg: DictConfig | None, name: str, rows: list[dict], tested: dict[str, dict], train: str) -> str:
    """The metadata, title, origin and results."""
    pretrained = _get(cfg, "model.pretrained")
    hub_id = pretrained if pretrained and not Path(str(pretrained)).expanduser().exists() else None
    corpus, datasets = _corpus(cfg)
    metadata = {
        "library_name": "transformers",
        **({"base_model": hub_id} if hub_id else {}),
        "tags": ["automatic-speech-recognition", "ctc", "asr-lightning"],
        **({"datasets": datasets} if datasets else {}),
        "metrics": ["wer"],
        "model-index": [{"name": name, "results": _model_index(tested, corpus, datasets)}],
    }
    origin = "This model was trained from scratch"
    if pretrained:
        link = f"[{hub_id}](https://huggingface.co/{hub_id})" if hub_id else f"`{pretrained}`"
        origin = f"This model is a fine-tuned version of {link}"
    lines = [f"---\n{yaml.safe_dump(metadata, sort_keys=False)}---", "", f"# {name}", ""]
    lines.append(f"{origin} on {f'the {train} split of {corpus}' if corpus else 'an unknown dataset'}.")
    if rows:
        lines.append(f"It achieves the following results on the evaluation set (step {rows[-1]['Step']}):")
        results = {("Loss" if k == "Validation Loss" else k): v for k, v in rows[-1].items()}
        lines += [f"- {k}: {_round(v)}" for k, v in results.items() if k not in ("Training Loss", "Epoch", "Step")]
    if tested:
        lines.append("On the test splits (the run's metrics.json, for these weights):")
        lines += [f"- {split} Wer: {_round(v['wer'])}, Cer: {_round(v['cer'])}" for split, v in tested.items()]
    return "\n".join(lines)


def _description(model: TrainedModel, checkpoint: str, name: str) -> str:
    config = model.backbone.config
    parameters = sum(p.numel() for p in model.backbone.parameters())
    return (
        f"A `{type(model.backbone).__name__}` ({parameters / 1e6:.1f}M parameters, {config.num_hidden_layers} "
        f"transformer layers of width {config.hidden_size}) with a character CTC head over {len(model.tokenizer)} "
        "tokens (`vocab.json`; the blank is `<pad>`, `|` separates words). It takes "
        f"{model.sample_rate} Hz mono audio, normalised to zero mean and unit variance per utterance (the feature "
        "extractor does it), and its transcripts are upper case letters and apostrophes.\n\n"
        f"Trained with asr (PyTorch Lightning + Hydra); exported from `{checkpoint}` (global step {model.step}) with "
        f"`python -m asr.export`. Greedy decoding:\n\n{USAGE.format(path=name)}"
    )


def hyperparameters(cfg: DictConfig) -> dict:
    """The run's recipe, as the Trainer's cards list it."""
    out: dict = {"learning_rate": _get(cfg, "optimizer.lr")}
    batch, seconds = _get(cfg, "data.batch_size"), _get(cfg, "data.max_batch_seconds")
    out.update({"train_batch_size": batch} if batch else {"train_batch_seconds": seconds})
    eval_batch, eval_seconds = _get(cfg, "data.eval_batch_size"), _get(cfg, "data.eval_max_batch_seconds")
    out.update({"eval_batch_size": eval_batch} if eval_batch else {"eval_batch_seconds": eval_seconds})
    out["seed"] = _get(cfg, "seed")
    devices, nodes = _get(cfg, "trainer.devices"), _get(cfg, "trainer.num_nodes") or 1
    world = devices * nodes if isinstance(devices, int) else None
    accumulate = _get(cfg, "trainer.accumulate_grad_batches") or 1
    if world and world > 1:
        out.update(distributed_type="multi-GPU", num_devices=world)
    if accumulate > 1:
        out["gradient_accumulation_steps"] = accumulate
    if batch and world and batch * world * accumulate != batch:
        out["total_train_batch_size"] = batch * world * accumulate
    optimizer = _get(cfg, "optimizer") or {}
    if optimizer:
        described = f"{str(optimizer.get('_target_')).rpartition('.')[2]}"
        if optimizer.get("betas"):
            described += f" with betas=({','.join(map(str, optimizer['betas']))}) and epsilon={optimizer.get('eps')}"
        if optimizer.get("weight_decay"):
            described += f" and weight_decay={optimizer['weight_decay']}"
        out["optimizer"] = described
    scheduler = _get(cfg, "scheduler") or {}
    if scheduler:
        out["lr_scheduler_type"] = str(scheduler.get("_target_")).rpartition(".")[2]
        out.update({f"lr_scheduler_{k}": v for k, v in scheduler.items() if not k.startswith("_")})
    for key, name in (("max_steps", "training_steps"), ("max_epochs", "num_epochs"), ("max_time", "max_time")):
        value = _get(cfg, f"trainer.{key}")
        if value is not None and value != -1:
            out[name] = value
    precision = str(_get(cfg, "trainer.precision"))
    if precision.endswith("-mixed"):
        out["mixed_precision_training"] = "Native AMP" + (" (bf16)" if precision.startswith("bf16") else "")
    return out


def training_results(run: Path) -> tuple[list[dict], str]:
    """The rows of the Trainer's results table, one per validation, from the run's CSV logs (all versions, in
    order); with no rows, why not."""
    files = sorted((run / "csv").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.rpartition("_")[2]))
    if not files:
        return [], f"the run folder {run} has no CSV logs (csv/version_*/metrics.csv; logger=csv writes them)"
    logged = [row for path in files for row in csv.DictReader(path.open())]
    val = sorted({k.split("/")[1] for row in logged for k in row if k.startswith("val/") and k.count("/") == 2})
    rows, train_loss, epoch_ends = [], "No log", _epoch_ends(logged)
    for row in logged:
        if row.get("train/loss"):
            train_loss = float(row["train/loss"])
        if not row.get("val/wer"):
            continue
        step = int(row["step"])  # Lightning logs the 0-based index of the step: the Trainer's Step is the count
        line = {"Training Loss": train_loss, "Epoch": _epochs(step, int(row["epoch"]), epoch_ends), "Step": step + 1}
        losses = [float(row[f"val/{s}/loss"]) for s in val if row.get(f"val/{s}/loss")]
        line["Validation Loss"] = sum(losses) / len(losses) if losses else "No log"
        line["Wer"] = float(row["val/wer"])
        if len(val) > 1:
            line.update({f"Wer {s}": float(row[f"val/{s}/wer"]) for s in val if row.get(f"val/{s}/wer")})
        rows.append(line)
    return rows, "" if rows else "the CSV logs hold no validation (val/wer)"


def _epoch_ends(logged: list[dict]) -> dict[int, int]:
    """Epoch -> its last step logged by training or validation (epoch-level metrics are logged at an epoch's last
    step; the test after training is logged as the next epoch)."""
    ends: dict[int, int] = {}
    for row in logged:
        if any(value for key, value in row.items() if key.startswith(("train/", "val/"))):
            ends[int(row["epoch"])] = max(ends.get(int(row["epoch"]), -1), int(row["step"]))
    return ends


def _epochs(step: int, epoch: int, ends: dict[int, int]) -> float:
    """Epochs done after ``step`` (0-based) of ``epoch``, as a fraction: the Trainer's Epoch column. The last epoch
    may be cut short: it is measured by the one before."""
    start = ends.get(epoch - 1, -1) + 1
    finished = {e: ends[e] - ends.get(e - 1, -1) for e in ends if e + 1 in ends}
    length = finished.get(epoch) or finished.get(epoch - 1) or ends[epoch] - start + 1
    return round(epoch + (step + 1 - start) / length, 2)


def _test_metrics(run: Path, ckpt_path: Path) -> dict[str, dict]:
    """Per test split, the WER and CER of metrics.json, if it names this checkpoint (the weights it tested)."""
    path = run / "metrics.json"
    if not path.is_file():
        return {}
    metrics = json.loads(path.read_text())
    if not metrics.get("checkpoint") or Path(metrics["checkpoint"]).resolve() != ckpt_path:
        return {}
    splits = sorted({k.split("/")[1] for k in metrics if k.startswith("test/") and k.count("/") == 2})
    return {s: {"wer": metrics[f"test/{s}/wer"], "cer": metrics[f"test/{s}/cer"]} for s in splits}


def _model_index(tested: dict[str, dict], corpus: str | None, datasets: list[str]) -> list[dict]:
    """The Hub's results of the test splits."""
    kind = datasets[0] if datasets else "custom"
    return [
        {
            "task": {"name": "Automatic Speech Recognition", "type": "automatic-speech-recognition"},
            "dataset": {"name": f"{corpus or 'unknown'} ({split})", "type": kind, "split": split},
            "metrics": [{"name": "Wer", "type": "wer", "value": round(values["wer"], 4)}],
        }
        for split, values in tested.items()
    ]


def _config(run: Path) -> DictConfig | None:
    path = run / ".hydra" / "config.yaml"
    return OmegaConf.load(path) if path.is_file() else None


def _get(cfg: DictConfig | None, key: str):
    """A value of the run's config, interpolations resolved where they can be outside the run (else None)."""
    if cfg is None:
        return None
    value = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
    return OmegaConf.to_container(value, resolve=False) if OmegaConf.is_config(value) else value


def _corpus(cfg: DictConfig | None) -> tuple[str | None, list[str]]:
    """How the card names the training data, and its Hub datasets."""
    source, splits = str(_get(cfg, "data.source._target_") or ""), _get(cfg, "data.train_splits") or []
    if not source:
        return None, []
    if source.endswith("DemoSource"):
        return "the asr demo corpus, synthetic speech by eSpeak NG", []
    if _get(cfg, "data.source.dataset"):
        return _get(cfg, "data.source.dataset"), [_get(cfg, "data.source.dataset")]
    if all(part in MD5 for split in splits for part in parts(split)):
        return "LibriSpeech", ["openslr/librispeech_asr"]
    return "a corpus in LibriSpeech's layout", []


def _names(splits) -> str:
    return ", ".join(splits) if isinstance(splits, list) else str(splits)


def _round(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) and not math.isnan(value) else str(value)
