"""Training throughput of the real training path: ``python -m asr.bench [overrides]``.

It composes the same config as ``asr.train`` (``conf/bench.yaml`` = ``conf/train.yaml`` + ``bench.*``), writes
a synthetic corpus of 16 kHz FLAC files in the LibriSpeech layout (so decoding is in the loop), and trains for
``bench.warmup_steps + bench.steps`` steps with our SpeechDataModule, SpeechRecognizer and a Lightning Trainer
built from the config. ``bench.baseline=hf_trainer`` also runs transformers' ``Trainer`` with the model card's
recipe on the same files in the same process; ``bench.variants`` adds more runs of our path with extra
overrides.

Reported per run (JSON in the run folder, ``bench.json``, and printed): audio-seconds per second after warm-up
(timed between ``torch.cuda.synchronize()`` calls, audio counted on the device from the attention masks), step
time, padding, peak GPU memory, and MFU from the FLOPs of one forward+backward counted by
``torch.utils.flop_counter``.

The duration profile imitates LibriSpeech train-clean-100 (28,539 utterances, 100.6 h: mean 12.7 s, most
between 10 and 16.5 s, 1.4 s to 24.5 s): 80% normal(13.55 s, 1.6 s) clipped to [10, 16.5], 15% uniform in
[1.3, 10), 5% uniform in (16.5, 24.5]; mean about 12.7 s. Transcripts are random letters at about 14.5
characters per second.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import platform
import shlex
import statistics
import time
import traceback
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import hydra
import lightning as L
import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from asr.backbones import build_backbone, random_init
from asr.builders import build_callbacks, build_datamodule, build_logger, build_model, build_tokenizer, build_trainer
from asr.data.librispeech import SAMPLE_RATE
from asr.data.sources.folder import FolderSource
from asr.data.synthetic import train_clean_100_durations
from asr.data.text import CharTokenizer, normalize

log = logging.getLogger(__name__)

TRAIN, DEV, TEST = "train-clean-100", "dev-clean", "test-clean"
CHARS_PER_SECOND = 14.5

# --------------------------------------------------------------------------------------------------- corpus


def _random_text(rng: np.random.Generator, seconds: float) -> str:
    letters = np.array(list("ABCDEFGHIJKLMNOPRSTUVWY"))
    words, chars = [], 0
    target = max(2, int(CHARS_PER_SECOND * seconds))
    while chars < target:
        word = "".join(rng.choice(letters, size=int(rng.integers(2, 9))))
        words.append(word)
        chars += len(word) + 1
    return " ".join(words)


def _write_flac(job: tuple[str, int, int]) -> None:
    path, samples, seed = job
    rng = np.random.default_rng(seed)
    # Noise under a syllable-rate (4 Hz) envelope: compresses and decodes about like speech.
    envelope = np.repeat(rng.random(samples // 4000 + 1) ** 2, 4000)[:samples]
    audio = (0.3 * rng.standard_normal(samples) * (0.05 + envelope)).clip(-1, 1).astype(np.float32)
    sf.write(path, audio, SAMPLE_RATE, format="FLAC")


def write_corpus(spec: DictConfig) -> Path:
    """The synthetic corpus of ``spec`` (bench.corpus), written on first use: ``<dir>/LibriSpeech/<split>/``.

    ``<dir>/index-<split>.json`` lists ``[path, transcript, samples]`` of each utterance for the HF baseline.
    """
    scale = float(spec.duration_scale)
    name = f"h{float(spec.hours):g}-t{float(spec.test_hours):g}-s{int(spec.seed)}-x{scale:g}"
    root = Path(str(spec.root)).expanduser() / name
    if (root / "done.json").is_file():
        return root
    rng = np.random.default_rng(int(spec.seed))
    mean = 12.7 * scale
    sizes = {TRAIN: max(4, round(float(spec.hours) * 3600 / mean)), DEV: 4}
    if float(spec.test_hours) > 0:
        sizes[TEST] = max(4, round(float(spec.test_hours) * 3600 / mean))
    jobs, stats = [], {}
    for split, count in sizes.items():
        durations = train_clean_100_durations(count, rng) * scale
        index, transcripts = [], {}
        for k, seconds in enumerate(durations):
            speaker, chapter, utt = 1000 + k // 40, 1, k % 40
            folder = root / "LibriSpeech" / split / str(speaker) / str(chapter)
            folder.mkdir(parents=True, exist_ok=True)
            utt_id = f"{speaker}-{chapter}-{utt:04d}"
            samples = int(round(seconds * SAMPLE_RATE))
            text = _random_text(rng, seconds)
            transcripts.setdefault(folder / f"{speaker}-{chapter}.trans.txt", []).append(f"{utt_id} {text}")
            path = folder / f"{utt_id}.flac"
            jobs.append((str(path), samples, int(rng.integers(2**31))))
            index.append([str(path), text, samples])
        for trans, lines in transcripts.items():
            trans.write_text("\n".join(lines) + "\n")
        (root / f"index-{split}.json").write_text(json.dumps(index))
        in_range = (durations >= 10 * scale) & (durations <= 16.5 * scale)
        stats[split] = {
            "utterances": count,
            "hours": round(float(durations.sum()) / 3600, 3),
            "mean_s": round(float(durations.mean()), 2),
            "min_s": round(float(durations.min()), 2),
            "max_s": round(float(durations.max()), 2),
            "share_10_to_16.5_s": round(float(in_range.mean()), 3),
        }
    workers = spec.workers or min(16, os.cpu_count() or 1)
    start = time.perf_counter()
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_flac, jobs, chunksize=16))
    else:
        for job in jobs:
            _write_flac(job)
    log.info("Wrote %d FLAC files in %.1f s under %s", len(jobs), time.perf_counter() - start, root)
    (root / "done.json").write_text(json.dumps(stats, indent=1))
    return root


def corpus_stats(root: Path) -> dict:
    return json.loads((root / "done.json").read_text())


def write_augment_folders(root: Path, files: int = 8) -> Path:
    """Folders for the augmentation variants, written once: ``<root>/noise`` (10 s of coloured noise per file) and
    ``<root>/rirs`` (synthetic room impulse responses: a direct path, then an exponentially decaying tail with an RT60
    of 0.2 to 0.8 s)."""
    if (root / "done").is_file():
        return root
    rng = np.random.default_rng(0)
    for name in ("noise", "rirs"):
        (root / name).mkdir(parents=True, exist_ok=True)
    for k in range(files):
        pole = rng.uniform(0.0, 0.95)  # a one-pole low-pass: white to reddish noise
        white = torch.from_numpy(rng.standard_normal(10 * SAMPLE_RATE).astype(np.float32))
        noise = AF.lfilter(white, torch.tensor([1.0, -pole]), torch.tensor([1.0, 0.0]), clamp=False).numpy()
        sf.write(root / "noise" / f"noise-{k:02d}.flac", 0.5 * noise / np.abs(noise).max(), SAMPLE_RATE)
        rt60 = rng.uniform(0.2, 0.8)
        t = np.arange(int(rt60 * SAMPLE_RATE)) / SAMPLE_RATE
        rir = rng.standard_normal(len(t)) * np.exp(-6.9 * t / rt60) * 0.3
        rir[0] = 1.0
        sf.write(root / "rirs" / f"rir-{k:02d}.flac", 0.9 * rir / np.abs(rir).max(), SAMPLE_RATE)
    (root / "done").write_text("")
    return root


# --------------------------------------------------------------------------------------------- measurement


class Meter:
    """Times steps ``warmup+1 .. warmup+steps`` and counts their audio on the device, with no sync in between.

    Call :meth:`start` when training starts, :meth:`batch` with each batch's attention mask, :meth:`step_end`
    after each step; it returns True when the run can stop (after the measured and the profiled steps).
    """

    def __init__(
        self,
        warmup: int,
        steps: int,
        device: torch.device,
        sync_debug: bool = False,
        profile_steps: int = 0,
        profile_path: Path | None = None,
    ) -> None:
        self.warmup, self.steps, self.device = warmup, steps, device
        self.cuda = device.type == "cuda"
        self.sync_debug = sync_debug and self.cuda
        self.profile_steps, self.profile_path = profile_steps, profile_path
        self.completed = 0
        self.audio = torch.zeros((), dtype=torch.long, device=device)
        self.padded = 0
        self.utterances = 0
        self.events: list[torch.cuda.Event] = []
        self.t_start = self.t0 = self.t1 = None
        self.cpu0 = self.cpu1 = 0.0  # this process's CPU time, all threads: less sensitive to a shared CPU
        self._warnings = None
        self._caught: list = []
        self._profiler = None

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps + self.profile_steps

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self.t_start = time.perf_counter()
        if self.warmup == 0:
            self._begin()

    def _begin(self) -> None:
        self._sync()
        self.t0 = time.perf_counter()
        self.cpu0 = time.process_time()
        if self.cuda:
            self.events.append(torch.cuda.Event(enable_timing=True))
            self.events[-1].record()
        if self.sync_debug:
            self._warnings = warnings.catch_warnings(record=True)
            self._caught = self._warnings.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def _end(self) -> None:
        if self.sync_debug:
            torch.cuda.set_sync_debug_mode(0)
            self._warnings.__exit__(None, None, None)
        self._sync()
        self.t1 = time.perf_counter()
        self.cpu1 = time.process_time()

    @property
    def measuring(self) -> bool:
        return self.t0 is not None and self.t1 is None

    def batch(self, attention_mask: torch.Tensor) -> None:
        if self.measuring:
            self.audio += attention_mask.sum()
            self.padded += attention_mask.numel()
            self.utterances += attention_mask.shape[0]

    def step_end(self) -> bool:
        self.completed += 1
        if self.completed == self.warmup and self.t0 is None:
            self._begin()
        elif self.measuring:
            if self.cuda:
                self.events.append(torch.cuda.Event(enable_timing=True))
                self.events[-1].record()
            if self.completed == self.warmup + self.steps:
                self._end()
                if self.profile_steps:
                    self._profiler = torch.profiler.profile(
                        activities=[torch.profiler.ProfilerActivity.CPU]
                        + ([torch.profiler.ProfilerActivity.CUDA] if self.cuda else [])
                    )
                    self._profiler.__enter__()
        if self.completed == self.total_steps and self._profiler is not None:
            self._sync()
            self._profiler.__exit__(None, None, None)
            key = "self_device_time_total" if self.cuda else "self_cpu_time_total"
            table = self._profiler.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=80)
            if self.profile_path is not None:
                self.profile_path.write_text(table)
            self._profiler = None
        return self.completed >= self.total_steps

    def result(self) -> dict:
        if self.t1 is None:
            raise RuntimeError(f"the run ended after {self.completed} of {self.warmup + self.steps} steps")
        seconds = self.t1 - self.t0
        audio = float(self.audio) / SAMPLE_RATE
        out = {
            "audio_seconds_per_second": audio / seconds,
            "step_time_ms": 1000 * seconds / self.steps,
            "cpu_time_per_step_ms": 1000 * (self.cpu1 - self.cpu0) / self.steps,
            "audio_seconds_per_step": audio / self.steps,
            "utterances_per_step": self.utterances / self.steps,
            "padding_fraction": 1 - audio * SAMPLE_RATE / self.padded if self.padded else 0.0,
            "warmup_seconds": self.t0 - self.t_start,
            "measured_seconds": seconds,
            "warmup_steps": self.warmup,
            "steps": self.steps,
        }
        if self.cuda and len(self.events) > 1:
            times = [a.elapsed_time(b) for a, b in zip(self.events, self.events[1:], strict=False)]
            out["step_time_ms_median"] = statistics.median(times)
            out["step_time_ms_max"] = max(times)
        if self.sync_debug:
            where = Counter(
                f"{Path(w.filename).name}:{w.lineno}" for w in self._caught if "synchroniz" in str(w.message)
            )
            out["syncs_per_step"] = sum(where.values()) / self.steps
            out["sync_sites"] = dict(where.most_common(12))
        return out


class LightningMeter(Callback):
    def __init__(self, meter: Meter) -> None:
        self.meter = meter

    def on_train_start(self, trainer, pl_module) -> None:
        self.meter.start()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.meter.batch(batch["attention_mask"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.meter.step_end():
            trainer.should_stop = True


def flops_per_audio_second(backbone: torch.nn.Module, seconds: float, tokenizer: CharTokenizer) -> float:
    """FLOPs of one forward+backward (the model's own CTC loss) on one utterance, per second of audio."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(backbone.parameters()).device
    samples = int(seconds * SAMPLE_RATE)
    audio = torch.randn(1, samples, device=device)
    mask = torch.ones(1, samples, dtype=torch.long, device=device)
    labels = torch.randint(5, len(tokenizer), (1, max(1, int(seconds * CHARS_PER_SECOND))), device=device)
    training = backbone.training
    backbone.train()
    with FlopCounterMode(display=False) as counter:
        backbone(audio, attention_mask=mask, labels=labels).loss.backward()
    backbone.zero_grad(set_to_none=True)
    backbone.train(training)
    return counter.get_total_flops() / seconds


# ------------------------------------------------------------------------------------------------ the arms


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _memory(result: dict) -> None:
    if torch.cuda.is_available():
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30


def _arm_settings(cfg: DictConfig) -> dict:
    model, data, opt = cfg.model, cfg.data, cfg.optimizer
    return {
        "precision": str(cfg.trainer.precision),
        "batch_size": data.get("batch_size"),
        "max_batch_seconds": data.get("max_batch_seconds"),
        "num_workers": data.get("num_workers"),
        "fused": opt.get("fused"),
        "compile": model.get("compile"),
        "packed": model.get("packed", False),
        "device_specaugment": model.get("device_specaugment", True),
        "sync_free_logging": model.get("sync_free_logging", True),
        "attn_implementation": model.get("attn_implementation"),
        "mask_time_prob": (model.get("config") or {}).get("mask_time_prob"),
        "augment": {
            name: OmegaConf.to_container(cfg.augment[name], resolve=True)
            for name in ("speed", "reverb", "noise")
            if (cfg.get("augment") or {}).get(name)
        },
    }


def run_ours(cfg: DictConfig, corpus: Path, name: str, run_dir: Path, flops: dict) -> dict:
    """Our training path on the corpus with ``cfg``: SpeechDataModule, SpeechRecognizer, lightning.Trainer."""
    device = _device()
    with open_dict(cfg):
        cfg.data.root = str(corpus)
        cfg.data.source = {"_target_": f"{FolderSource.__module__}.{FolderSource.__name__}", "root": str(corpus)}
        cfg.data.train_splits, cfg.data.val_splits, cfg.data.test_splits = [TRAIN], [DEV], [DEV]
        if device.type == "cpu" and str(cfg.trainer.precision).startswith("16"):
            cfg.trainer.precision = "32-true"  # no fp16 autocast on CPU
    settings = _arm_settings(cfg)
    L.seed_everything(cfg.seed, workers=True)
    tokenizer = build_tokenizer()
    with torch.device(device):  # random init on the GPU takes a fraction of the time it takes on the CPU
        model = build_model(cfg, tokenizer)
    datamodule = build_datamodule(cfg, tokenizer, model.input_facts)
    key = json.dumps(model.backbone.config.to_diff_dict(), sort_keys=True, default=str)
    if key not in flops:
        model.to(device)
        flops[key] = flops_per_audio_second(model.backbone, cfg.bench.flops_seconds, tokenizer)
    bench = cfg.bench
    meter = Meter(
        bench.warmup_steps, bench.steps, device, bench.sync_debug, bench.profile_steps, run_dir / f"profile-{name}.txt"
    )
    callbacks = [LightningMeter(meter), *(build_callbacks(cfg, only=("progress",)) if bench.progress_bar else [])]
    logger = build_logger(cfg, name=f"csv-{name}") if bench.logger else False
    trainer = build_trainer(
        cfg,
        callbacks=callbacks,
        logger=logger,
        max_steps=meter.total_steps,
        max_epochs=-1,
        max_time=None,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_model_summary=False,
        fast_dev_run=False,
        enable_progress_bar=len(callbacks) > 1,
        default_root_dir=str(run_dir / name),
    )
    trainer.fit(model, datamodule=datamodule)
    result = {**meter.result(), "settings": settings, "flops_per_audio_second": flops[key]}
    if model.compiled:
        result["settings"]["compiled"] = model.compiled
    _memory(result)
    return result


class _FlacDataset(torch.utils.data.Dataset):
    """The corpus as the card's script feeds it: normalised audio and label ids (decoded here, from FLAC)."""

    def __init__(self, index: list, tokenizer: CharTokenizer) -> None:
        self.index, self.tokenizer = index, tokenizer

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        path, text, _ = self.index[i]
        audio, _ = sf.read(path, dtype="float32")
        audio = (audio - audio.mean()) / np.sqrt(audio.var() + 1e-7)
        return {"input_values": audio, "labels": self.tokenizer.encode(normalize(text))}


def _pad_for_ctc(features: list[dict]) -> dict:
    """The card script's DataCollatorCTCWithPadding: padded audio and its mask, labels padded with -100."""
    lengths = [len(f["input_values"]) for f in features]
    audio = torch.zeros(len(features), max(lengths))
    mask = torch.zeros(len(features), max(lengths), dtype=torch.long)
    labels = torch.full((len(features), max(len(f["labels"]) for f in features)), -100, dtype=torch.long)
    for k, f in enumerate(features):
        audio[k, : lengths[k]] = torch.from_numpy(f["input_values"])
        mask[k, : lengths[k]] = 1
        labels[k, : len(f["labels"])] = torch.tensor(f["labels"])
    return {"input_values": audio, "attention_mask": mask, "labels": labels}


def run_hf_trainer(cfg: DictConfig, corpus: Path, run_dir: Path, flops: dict) -> dict:
    """transformers' Trainer with the model card's recipe (bench.hf) on the same FLAC files."""
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_pt_utils import LengthGroupedSampler

    hf, bench, device = cfg.bench.hf, cfg.bench, _device()
    tokenizer = build_tokenizer()
    model_config = OmegaConf.to_container(cfg.model.config or {}, resolve=True)
    with torch.device(device):
        backbone = build_backbone(cfg.model.get("pretrained"), model_config, tokenizer, hf.attn_implementation)
    backbone.config.ctc_loss_reduction = hf.ctc_loss_reduction
    backbone.config.ctc_zero_infinity = True
    backbone.freeze_feature_encoder()
    backbone.to(device)
    key = json.dumps(backbone.config.to_diff_dict(), sort_keys=True, default=str)
    if key not in flops:
        flops[key] = flops_per_audio_second(backbone, bench.flops_seconds, tokenizer)
    index = json.loads((corpus / f"index-{TRAIN}.json").read_text())
    meter = Meter(
        bench.warmup_steps,
        bench.steps,
        device,
        bench.sync_debug,
        bench.profile_steps,
        run_dir / "profile-hf_trainer.txt",
    )

    class MeterCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            meter.start()

        def on_step_end(self, args, state, control, **kwargs):
            if meter.step_end():
                control.should_training_stop = True

    def count_audio(module, args, kwargs):
        meter.batch(kwargs["attention_mask"] if "attention_mask" in kwargs else args[1])

    lengths = [samples for _, _, samples in index]

    class CardTrainer(Trainer):
        # group_by_length with the lengths the card's script stores in its dataset (datasets is not needed).
        def _get_train_sampler(self, train_dataset=None):
            size = self.args.train_batch_size * self.args.gradient_accumulation_steps
            return LengthGroupedSampler(size, lengths=lengths)

    fp16 = bool(hf.fp16) and device.type == "cuda"
    args = TrainingArguments(
        output_dir=str(run_dir / "hf_trainer"),
        per_device_train_batch_size=hf.batch_size,
        learning_rate=hf.learning_rate,
        warmup_steps=hf.warmup_steps,
        lr_scheduler_type="linear",
        optim=hf.optim,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        weight_decay=0.0,
        fp16=fp16,
        gradient_checkpointing=bool(hf.gradient_checkpointing),
        train_sampling_strategy="group_by_length",
        max_steps=meter.total_steps,
        save_strategy="no",
        report_to="none",
        logging_steps=500,
        seed=cfg.seed,
        dataloader_num_workers=hf.num_workers,
        remove_unused_columns=False,
        disable_tqdm=True,
        use_cpu=device.type == "cpu",
    )
    trainer = CardTrainer(
        model=backbone,
        args=args,
        train_dataset=_FlacDataset(index, tokenizer),
        data_collator=_pad_for_ctc,
        callbacks=[MeterCallback()],
    )
    hook = backbone.register_forward_pre_hook(count_audio, with_kwargs=True)
    try:
        trainer.train()
    finally:
        hook.remove()
    result = {
        **meter.result(),
        "flops_per_audio_second": flops[key],
        "settings": {
            "precision": "16-mixed" if fp16 else "32-true",
            "batch_size": hf.batch_size,
            "gradient_checkpointing": bool(hf.gradient_checkpointing),
            "optim": hf.optim,
            "attn_implementation": hf.attn_implementation,
            "num_workers": hf.num_workers,
            "train_sampling_strategy": "group_by_length",
        },
    }
    _memory(result)
    return result


def _guarded(name: str, fn, *args) -> dict:
    _release()
    start = time.perf_counter()
    try:
        result = fn(*args)
    except Exception as err:  # noqa: BLE001 - one failed arm (say, out of memory) must not lose the others
        log.error("%s failed:\n%s", name, traceback.format_exc())
        result = {"error": f"{type(err).__name__}: {err}"[:2000]}
    result["wall_seconds"] = time.perf_counter() - start
    _release()
    return result


def _finish(result: dict, peak_tflops: float, cuda: bool, baseline: float | None) -> None:
    """Model TFLOP/s, MFU (on a GPU) and the ratio to the baseline's audio-seconds per second."""
    if "audio_seconds_per_second" not in result:
        return
    achieved = result["audio_seconds_per_second"] * result["flops_per_audio_second"]
    result["model_tflops_per_second"] = achieved / 1e12
    result["mfu"] = achieved / (peak_tflops * 1e12) if cuda else None
    if baseline:
        result["ratio_to_hf_trainer"] = result["audio_seconds_per_second"] / baseline


def _table(results: dict) -> str:
    head = (
        f"{'arm':<28} {'audio-s/s':>10} {'step ms':>8} {'cpu ms':>8} {'audio s/step':>12} {'pad':>5} {'peak GiB':>8} "
        f"{'MFU':>6} {'x HF':>6}"
    )
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"{name:<28} failed: {r['error'][:80]}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        ratio = f"{r['ratio_to_hf_trainer']:.2f}" if r.get("ratio_to_hf_trainer") else "-"
        peak = f"{r['peak_memory_gib']:.1f}" if "peak_memory_gib" in r else "-"
        lines.append(
            f"{name:<28} {r['audio_seconds_per_second']:>10.1f} {r['step_time_ms']:>8.1f} "
            f"{r['cpu_time_per_step_ms']:>8.1f} {r['audio_seconds_per_step']:>12.1f} {r['padding_fraction']:>5.3f} "
            f"{peak:>8} {mfu:>6} {ratio:>6}"
        )
    return "\n".join(lines)


def bench(cfg: DictConfig) -> dict:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = cfg.bench
    if spec.random_init:
        random_init(cfg.model)
    corpus = write_corpus(spec.corpus)
    device = _device()
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "cpus": os.cpu_count(),
        "versions": {
            "torch": torch.__version__,
            "lightning": L.__version__,
            "transformers": __import__("transformers").__version__,
        },
        "corpus": {"root": str(corpus), **corpus_stats(corpus)},
        "peak_tflops": spec.peak_tflops,
        "overrides": list(HydraConfig.get().overrides.task),
        "arms": {},
    }
    flops: dict = {}
    arms = report["arms"]
    path = run_dir / "bench.json"

    def save() -> None:
        path.write_text(json.dumps(report, indent=1, default=str))

    cuda = device.type == "cuda"
    if spec.baseline == "hf_trainer":
        arms["hf_trainer"] = _guarded("hf_trainer", run_hf_trainer, cfg, corpus, run_dir, flops)
        _finish(arms["hf_trainer"], spec.peak_tflops, cuda, None)
        save()
    elif spec.baseline:
        raise SystemExit(f"bench.baseline must be null or hf_trainer, not {spec.baseline!r}")
    runs = ([("ours", cfg)] if spec.ours else []) + [
        (name, _compose_variant(overrides)) for name, overrides in (spec.variants or {}).items()
    ]
    folders = Path(str(spec.augment_folders)).expanduser()
    if any(_reads_from(arm_cfg, folders) for _, arm_cfg in runs):
        write_augment_folders(folders)
    base = arms.get("hf_trainer", {}).get("audio_seconds_per_second")
    for name, arm_cfg in runs:
        if spec.random_init:
            random_init(arm_cfg.model)
        arms[name] = _guarded(name, run_ours, arm_cfg, corpus, name, run_dir, flops)
        _finish(arms[name], spec.peak_tflops, cuda, base)
        save()
    print(_table(arms))
    print(json.dumps(report, indent=1, default=str))
    log.info("Results: %s", path)
    return report


def _reads_from(cfg: DictConfig, folders: Path) -> bool:
    """Whether the run's noise or reverb reads a folder under ``folders`` (bench.augment_folders)."""
    augment = cfg.get("augment") or {}
    paths = [(augment.get(name) or {}).get("folder") for name in ("noise", "reverb")]
    return any(path and Path(str(path)).expanduser().is_relative_to(folders) for path in paths)


def _compose_variant(overrides: str | list[str]) -> DictConfig:
    """The command line's config with ``overrides`` on top (Hydra's compose, inside this run).

    ``overrides`` is a list, or one string of space-separated overrides: ``+bench.variants.x="a=1 b=2"``.
    """
    extra = shlex.split(overrides) if isinstance(overrides, str) else [str(o) for o in overrides]
    task = [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith("bench.variants")]
    return hydra.compose(config_name="bench", overrides=task + extra)


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    bench(cfg)


if __name__ == "__main__":
    main()
