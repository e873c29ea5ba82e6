"""logger=wandb as a user runs it, offline: the run read back from its run file (``run-<id>.wandb``), a resumed run
that continues the same W&B run, and the stop, at once, of an online run without credentials."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch

from asr.callbacks import ValidationSamples
from asr.wandb_run import RUN_ID_FILE, WandbRunId, flatten, resumed_run_id
from tests.helpers import TINY_MODEL

# --- reading a run file ------------------------------------------------------------------------------------------
# A .wandb file is a LevelDB-style log (https://github.com/google/leveldb/blob/main/doc/log_format.md) of
# wandb_internal_pb2.Record messages, after a 7-byte header (":W&B", magic 0xBEE1, version 0); wandb's own reader
# (wandb.sdk.internal.datastore) is no longer in the Python package, so this is its scanning part.
BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def run_records(path: Path):
    """The Records of a .wandb file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:HEADER]) == (b":W&B", 0xBEE1, 0), "not a W&B run file"
    position, pieces = HEADER, b""
    while position + HEADER <= len(data):
        if BLOCK - position % BLOCK < HEADER:  # a block's trailer: zeros
            position += BLOCK - position % BLOCK
            continue
        checksum, length, kind = struct.unpack("<IHB", data[position : position + HEADER])
        if kind == 0:  # zeros: the end of what was written
            break
        chunk = data[position + HEADER : position + HEADER + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == checksum, f"corrupt at {position}"
        position += HEADER + length
        pieces = chunk if kind in (FULL, FIRST) else pieces + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            yield record


def read_run(run_dir: Path) -> dict:
    """A W&B run folder's run record, its config and its history rows, as wandb would upload them."""
    (path,) = run_dir.glob("run-*.wandb")
    run, config, history = None, {}, []
    for record in run_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            row: dict = {}
            for item in record.history.item:
                keys = [item.key] if item.key else list(item.nested_key)
                node = row
                for key in keys[:-1]:
                    node = node.setdefault(key, {})
                node[keys[-1]] = json.loads(item.value_json)
            history.append(row)
    return {"run": run, "config": config, "history": history, "dir": run_dir}


# --- running asr.train -------------------------------------------------------------------------------------------


def wandb_env(tmp: Path, **extra: str) -> dict[str, str]:
    """No W&B variables from outside; wandb's own folders under ``tmp``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}
    for name in ("CONFIG", "CACHE", "DATA"):
        env[f"WANDB_{name}_DIR"] = str(tmp / f"wandb-{name.lower()}")
    return {**env, "HF_HUB_OFFLINE": "1", **extra}


def run_train(*overrides: str, cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "asr.train", *overrides],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,  # a login prompt would get nothing rather than wait
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def demo(root: Path, steps: int) -> list[str]:
    """A few steps of the demo experiment on the fixture corpus, validating and writing logs every 2 steps."""
    return [
        "experiment=demo",
        f"data.root={root}",
        "data/source=folder",
        "trainer.max_time=null",
        f"trainer.max_steps={steps}",
        "trainer.val_check_interval=2",
        "trainer.log_every_n_steps=2",
        *TINY_MODEL,
        "logger=wandb",
    ]


def the_run(cwd: Path) -> tuple[Path, dict]:
    """The Hydra run folder under ``cwd``, and its W&B run read back."""
    (run_dir,) = cwd.glob("outputs/*/*/wandb/offline-run-*")
    return run_dir.parents[1], read_run(run_dir)


@pytest.fixture(scope="module")
def offline_run(demo_root, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("wandb-offline")
    overrides = [*demo(demo_root, steps=4), "logger.offline=true", "logger.tags=[demo,test]"]
    result = run_train(*overrides, cwd=cwd, env=wandb_env(cwd))
    assert result.returncode == 0, result.stderr[-3000:]
    return the_run(cwd)


def test_the_offline_run_file_has_the_config_the_metrics_and_the_predictions(offline_run):
    folder, run = offline_run
    record, config, history = run["run"], run["config"], run["history"]
    assert record.run_id == (folder / "checkpoints" / RUN_ID_FILE).read_text().strip()
    assert (record.project, record.run_group, record.job_type, list(record.tags)) == (
        "asr",
        "demo",
        "train",
        ["demo", "test"],
    )

    # The resolved Hydra config, flattened with dots: every key a dashboard column.
    assert config["optimizer.lr"] == 3e-3
    assert config["model.config.hidden_size"] == 64
    assert config["trainer.max_steps"] == 4
    assert config["data.val_splits"] == ["dev"]
    assert config["choices.experiment"] == "demo" and config["choices.logger"] == "wandb"
    assert config["logger.offline"] is True and config["output_dir"] == str(folder)
    assert "pretrained" not in config and "optimizer" not in config  # not Lightning's hparams, nor nested

    keys = set().union(*history)
    for key in ("train/loss", "train/lr", "train/grad_norm", "train/audio_seconds_per_second"):
        assert key in keys, key
    for key in ("val/wer", "val/cer", "val/dev/wer", "val/dev/cer", "test/wer", "test/test-seen/wer"):
        assert key in keys, key
    assert "train/peak_gpu_memory_gib" not in keys  # CUDA only

    # Gradient norm and throughput on the logging steps only (every 2 of 4 steps), with the loss.
    train = [row for row in history if "train/loss" in row]
    assert len(train) == 2
    assert all("train/grad_norm" in row and "train/audio_seconds_per_second" in row for row in train)
    assert all(0 < row["train/grad_norm"] < float("inf") and row["train/audio_seconds_per_second"] > 0 for row in train)

    # A table of predictions at each validation, at the validation's step.
    validations = [row["trainer/global_step"] for row in history if "val/wer" in row]
    tables = [row for row in history if "val/predictions" in row]
    assert len(validations) == 2
    assert [row["trainer/global_step"] for row in tables] == validations
    transcripts = {
        line.split(" ", 1)[0]: line.split(" ", 1)[1]
        for path in Path(config["data.root"], "LibriSpeech", "dev").rglob("*.trans.txt")
        for line in path.read_text().splitlines()
    }
    for row in tables:
        assert row["val/predictions"]["_type"] == "table-file"
        table = json.loads((run["dir"] / "files" / row["val/predictions"]["path"]).read_text())
        assert table["columns"] == ValidationSamples.COLUMNS
        assert 1 <= len(table["data"]) <= 4
        for _, split, id_, reference, hypothesis, wer, cer in table["data"]:
            assert split == "dev" and transcripts[id_] == reference
            assert isinstance(hypothesis, str) and wer >= 0 and cer >= 0


def test_a_resumed_run_continues_the_same_wandb_run(offline_run, demo_root, tmp_path):
    """Resumed from the first run's final checkpoint, offline through WANDB_MODE this time."""
    folder, first = offline_run
    checkpoint = folder / "checkpoints" / "final.ckpt"
    result = run_train(
        *demo(demo_root, steps=6),
        f"ckpt_path={checkpoint}",
        cwd=tmp_path,
        env=wandb_env(tmp_path, WANDB_MODE="offline"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    resumed_folder, resumed = the_run(tmp_path)
    run_id = first["run"].run_id
    assert resumed["run"].run_id == run_id
    assert (resumed_folder / "checkpoints" / RUN_ID_FILE).read_text().strip() == run_id
    assert resumed_run_id(resumed_folder / "checkpoints" / "final.ckpt") == run_id
    steps = [row["trainer/global_step"] for row in resumed["history"] if "train/loss" in row]
    assert steps and min(steps) >= 4  # it went on from step 4


def test_online_without_credentials_stops_at_once_and_says_how_to_go_on(demo_root, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = wandb_env(tmp_path, WANDB_MODE="online", HOME=str(home))
    start = time.time()
    result = run_train(*demo(demo_root, steps=4), cwd=tmp_path, env=env, timeout=300)
    assert result.returncode != 0
    assert time.time() - start < 120
    message = result.stderr
    assert "no W&B credentials" in message
    assert "wandb login" in message and "logger.offline=true" in message and "WANDB_MODE=offline" in message
    assert "Traceback" not in message
    assert not list(tmp_path.glob("outputs/*/*/wandb")) and not list(tmp_path.glob("outputs/*/*/checkpoints"))


# --- pieces ------------------------------------------------------------------------------------------------------


def test_flatten_joins_keys_with_dots_and_keeps_lists():
    tree = {"optimizer": {"lr": 1e-3, "betas": [0.9, 0.98]}, "model": {"config": {"hidden_size": 8}}, "empty": {}}
    assert flatten(tree) == {
        "optimizer.lr": 1e-3,
        "optimizer.betas": [0.9, 0.98],
        "model.config.hidden_size": 8,
        "empty": {},
    }


def test_the_run_id_is_read_from_the_checkpoint_or_the_file_beside_it(tmp_path):
    state_key = WandbRunId(str(tmp_path)).state_key
    torch.save({"callbacks": {state_key: {"run_id": "abc123"}}}, tmp_path / "with.ckpt")
    assert resumed_run_id(tmp_path / "with.ckpt") == "abc123"
    other = tmp_path / "other"
    other.mkdir()
    torch.save({"callbacks": {}}, other / "without.ckpt")
    assert resumed_run_id(other / "without.ckpt") is None
    (other / RUN_ID_FILE).write_text("def456\n")
    assert resumed_run_id(other / "without.ckpt") == "def456"
    assert resumed_run_id(None) is None and resumed_run_id(tmp_path / "missing.ckpt") is None


def test_group_and_name_default_to_the_experiment_or_the_sweep(tmp_path, monkeypatch):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    from asr.config import compose
    from asr.wandb_run import default_group_and_name

    cfg = compose("train", ["experiment=demo", "logger=wandb", "optimizer.lr=0.001"], hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path / "outputs" / "12-00-00")
    HydraConfig.instance().set_config(cfg)
    assert default_group_and_name() == ("demo", "experiment=demo,logger=wandb,optimizer.lr=0.001")

    sweep = tmp_path / "multirun" / "2025-06-01" / "12-00-00"
    cfg = compose("train", ["experiment=demo", "logger=wandb", "optimizer.lr=0.001"], hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.sweep.dir = str(sweep)
        cfg.hydra.sweep.subdir = "optimizer.lr=0.001"
        cfg.hydra.runtime.output_dir = str(sweep / "optimizer.lr=0.001")
    HydraConfig.instance().set_config(cfg)
    monkeypatch.chdir(tmp_path)
    assert default_group_and_name() == ("multirun/2025-06-01/12-00-00", "optimizer.lr=0.001")


def test_the_run_config_reaches_wandb_init_as_it_is(tmp_path):
    """Through Hydra's instantiate, a value holding ``${`` stays a string; tags become a plain list."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from asr.wandb_run import RunConfig

    cfg = OmegaConf.create({"_target_": "asr.wandb_run.WandbLogger", "save_dir": str(tmp_path), "tags": ["a"]})
    logger = instantiate(cfg, run_config=RunConfig({"overrides": ["x=${y}"], "optimizer.lr": 0.1}))
    assert logger._wandb_init["config"] == {"overrides": ["x=${y}"], "optimizer.lr": 0.1}
    assert logger._wandb_init["tags"] == ["a"] and "anonymous" not in logger._wandb_init
    assert logger._experiment is None  # nothing started yet
