"""Helpers shared by the tests: tiny model configs and batches, a mini corpus with every kind of bad input,
archives of it, an HTTP server of byte ranges with faults, DataModules over them, a quiet Trainer and
``python -m asr.train`` in a subprocess."""

from __future__ import annotations

import http.server
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import lightning as L
import numpy as np
import soundfile as sf
import torch

from asr.data.datamodule import SpeechDataModule
from asr.data.dataset import model_inputs
from asr.data.librispeech import Problem
from asr.data.manifest import Manifest, load_manifest
from asr.data.sources.archive import ArchiveSource
from asr.data.sources.folder import FolderSource
from asr.data.transfer import pcm_buffer

REPO = Path(__file__).resolve().parents[1]


def quiet_trainer(**options) -> L.Trainer:
    """A CPU Trainer that logs, checkpoints, prints nothing unless ``options`` say otherwise."""
    quiet = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**{**quiet, **options})


def run_train(*overrides: str, cwd: Path, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m asr.train *overrides`` offline, its output captured; the tests' own callbacks (tests.x.Y) import."""
    return subprocess.run(
        [sys.executable, "-m", "asr.train", *overrides],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), **(env or {})},
    )


# A tiny random-init HuBERT.
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

# The HuBERT / wav2vec 2.0 CNN's facts, as asr.builders gives them to the DataModule.
HUBERT_FACTS = dict(sample_rate=16_000, min_samples=400, frames_per_second=50.0)


def write_flac(path: Path, seconds: float, rate: int = 16_000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, (0.1 * torch.randn(int(seconds * rate))).numpy(), rate, format="FLAC")


# Usable utterances of the mini corpus: id -> transcript. 174-50561-0002 is truncated (its header reads, its
# audio does not decode); 174-50561-0006 has more letters than a 0.3 s clip has CTC frames (kept for
# evaluation).
USABLE = {
    "84-121123-0000": "GO DO YOU HEAR",
    "84-121123-0001": "BUT IN LESS THAN FIVE MINUTES",
    "174-50561-0000": "FORGOTTEN TOO THE NAME OF GILLIAN",
    "174-50561-0002": "A TRUNCATED FILE",
    "174-50561-0006": "A SENTENCE FAR TOO LONG FOR A THIRD OF A SECOND",
}
SOURCE_PROBLEMS = {  # found by scanning transcripts and headers: id -> reason
    "84-121123-0002": "audio without transcript",
    "84-121123-0003": "empty transcript",
    "84-121123-0009": "transcript without audio",
    "174-50561-0001": "unreadable audio",
    "2-3-0000": "audio without transcript",
}
CHECK_PROBLEMS = {  # found by Checks.problem
    "174-50561-0003": "wrong sample rate",
    "174-50561-0004": "shorter than the receptive field",
    "174-50561-0005": "characters outside the vocabulary",
}


def write_corpus(root: Path, split: str = "dev-clean") -> Path:
    """A mini LibriSpeech split with one utterance for every kind of bad input."""
    folder = root / "LibriSpeech" / split
    chapter = folder / "84" / "121123"
    write_flac(chapter / "84-121123-0000.flac", 1.0)
    write_flac(chapter / "84-121123-0001.flac", 2.5)
    write_flac(chapter / "84-121123-0002.flac", 0.5)
    write_flac(chapter / "84-121123-0003.flac", 0.7)
    (chapter / "84-121123.trans.txt").write_text(
        f"84-121123-0000 {USABLE['84-121123-0000']}\n84-121123-0001 {USABLE['84-121123-0001']}\n"
        "84-121123-0003\n84-121123-0009 MISSING AUDIO\n"
    )
    chapter = folder / "174" / "50561"
    write_flac(chapter / "174-50561-0000.flac", 1.5)
    (chapter / "174-50561-0001.flac").write_bytes(b"fLaC not really")
    write_flac(chapter / "174-50561-0002.flac", 2.0)
    whole = (chapter / "174-50561-0002.flac").read_bytes()
    (chapter / "174-50561-0002.flac").write_bytes(whole[: len(whole) // 2])
    write_flac(chapter / "174-50561-0003.flac", 1.0, rate=8_000)
    sf.write(chapter / "174-50561-0004.flac", np.zeros(100, np.float32), 16_000, format="FLAC")
    write_flac(chapter / "174-50561-0005.flac", 1.0)
    write_flac(chapter / "174-50561-0006.flac", 0.3)
    (chapter / "174-50561.trans.txt").write_text(
        f"174-50561-0000 {USABLE['174-50561-0000']}\n174-50561-0001 A CORRUPT FILE\n"
        f"174-50561-0002 {USABLE['174-50561-0002']}\n174-50561-0003 EIGHT KILOHERTZ\n"
        "174-50561-0004 TOO SHORT\n"
        f"174-50561-0005 CAFÉ NOIR\n174-50561-0006 {USABLE['174-50561-0006']}\n"
    )
    write_flac(folder / "2" / "3" / "2-3-0000.flac", 1.0)  # a chapter without any transcript file
    return folder


def make_archive(root: Path, split: str, archive: Path, transcripts_first: bool = False) -> Path:
    """``root/LibriSpeech/<split>`` as an OpenSLR-style ``.tar.gz``; by default every transcript comes after
    the audio of its chapter."""
    files = sorted(p for p in (root / "LibriSpeech" / split).rglob("*") if p.is_file())
    files.sort(key=lambda p: (p.parent, p.name.endswith(".trans.txt") != transcripts_first))
    with tarfile.open(archive, "w:gz") as tar:
        for path in files:
            tar.add(path, arcname=str(path.relative_to(root)))
    return archive


def key(problem: Problem) -> str:
    return Path(problem.where.rpartition(":")[2]).name.removesuffix(".flac")


def big_archive(tmp_path, chapters=6, per_chapter=10):
    """A clean split of ``chapters * per_chapter`` short utterances of varied length, as an archive."""
    transcripts = {}
    for c in range(chapters):
        folder = tmp_path / "LibriSpeech" / "train-clean-100" / str(10 + c) / "7"
        lines = []
        for k in range(per_chapter):
            utt_id = f"{10 + c}-7-{k:04d}"
            write_flac(folder / f"{utt_id}.flac", 0.2 + 0.05 * ((c * per_chapter + k) * 7 % 23))
            transcripts[utt_id] = ("HELLO", "WORLD", "SPEECH", "DATA")[k % 4]
            lines.append(f"{utt_id} {transcripts[utt_id]}")
        (folder / f"{10 + c}-7.trans.txt").write_text("\n".join(lines) + "\n")
    return str(make_archive(tmp_path, "train-clean-100", tmp_path / "train-clean-100.tar.gz")), transcripts


def scanned(archive: str, tmp_path: Path) -> Manifest:
    """The archive's manifest, with its gzip index."""
    return load_manifest(ArchiveSource(str(tmp_path)), archive, tmp_path / "manifests" / "train-clean-100.json")


def truncated_corpus(root, good=0, bad=2):
    folder = root / "LibriSpeech" / "dev-clean" / "5" / "6"
    for k in range(good + bad):
        write_flac(folder / f"5-6-{k}.flac", 1.0)
        if k >= good:
            whole = (folder / f"5-6-{k}.flac").read_bytes()
            (folder / f"5-6-{k}.flac").write_bytes(whole[: len(whole) // 2])
    (folder / "5-6.trans.txt").write_text("".join(f"5-6-{k} HELLO\n" for k in range(good + bad)))


class FolderHandler(http.server.SimpleHTTPRequestHandler):
    """A folder's files (GET and HEAD); a single byte range ("bytes=N-" or "bytes=N-M") when ``ranges``, with an
    ETag and ``If-Range``, as OpenSLR's server does. ``starts`` lists where the ranges asked for start. Faults, for
    the next ranged requests: ``statuses`` to answer with, ``cuts`` (bytes after which a response stops short, as a
    dropped connection); and a ``misplaced`` server sends every range from byte 0."""

    ranges = True
    starts: list[int] = []
    cuts: list[int] = []
    statuses: list[int] = []
    misplaced = False

    def send_head(self):
        path = Path(self.translate_path(self.path))
        requested = self.headers.get("Range")
        if not (self.ranges and requested and path.is_file()):
            return super().send_head()
        if self.statuses:
            self.send_error(self.statuses.pop(0))
            return None
        stat = path.stat()
        etag = f'"{stat.st_size}-{stat.st_mtime_ns}"'
        if self.headers.get("If-Range", etag) != etag:  # changed since the client's copy: the whole file
            return super().send_head()
        first, _, last = requested.removeprefix("bytes=").partition("-")
        size = stat.st_size
        start, end = int(first), min(int(last) if last else size - 1, size - 1)
        self.starts.append(start)
        start = 0 if self.misplaced else start
        body = path.read_bytes()[start : end + 1]
        sent = body[: self.cuts.pop(0)] if self.cuts else body
        self.send_response(206)
        self.send_header("ETag", etag)
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return io.BytesIO(sent)

    def log_message(self, *args):
        pass


def make_datamodule(root, tokenizer, source=None, **kwargs) -> SpeechDataModule:
    """A DataModule of the folder ``root`` (or of ``source``) without workers; ``kwargs`` override its settings."""
    defaults = dict(
        root=str(root),
        train_splits=["train"],
        val_splits=["dev"],
        test_splits=["test-seen"],
        tokenizer=tokenizer,
        max_batch_seconds=10,
        eval_batch_size=4,
        num_workers=0,
        **HUBERT_FACTS,
    )
    return SpeechDataModule(source=source or FolderSource(str(root)), **{**defaults, **kwargs})


def ready(dm: SpeechDataModule, stage: str | None = "fit") -> SpeechDataModule:
    dm.prepare_data()
    dm.setup(stage)
    return dm


def drain(dm: SpeechDataModule, loader, dataloader_idx: int = 0) -> list[dict]:
    """Iterate a loader as Lightning does, through the DataModule's batch hook."""
    return [dm.on_after_batch_transfer(batch, dataloader_idx) for batch in loader]


class Recorder(L.LightningModule):
    """Trains nothing; records every training batch (epoch, utterance ids, sum of its audio), and every
    validation batch."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen = []
        self.validated = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, tuple(batch["ids"]), float(batch["input_values"].sum())))
        return self.weight * batch["input_values"].mean()

    def validation_step(self, batch, batch_idx):
        self.validated.append((self.current_epoch, tuple(batch["ids"]), float(batch["input_values"].sum())))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


# Overrides that shrink the demo model for short runs of ``python -m asr.train``.
TINY_MODEL = [
    "model.config.hidden_size=64",
    "model.config.num_hidden_layers=2",
    "model.config.intermediate_size=128",
    "model.config.num_attention_heads=2",
]


def batch_of(audios: list[torch.Tensor], labels: list[list[int]]) -> dict:
    """A model batch of in-memory audio (floats in [-1, 1)), made as the data path makes it from FLAC."""
    pcm = pcm_buffer([len(a) for a in audios])
    for k, audio in enumerate(audios):
        pcm[k, : len(audio)] = (audio.clamp(-1, 1 - 2**-15) * 32768).round().to(torch.int16)
    return model_inputs({"input_values": pcm, "lengths": [len(a) for a in audios], "labels": labels})
