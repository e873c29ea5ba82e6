"""The entry point as a user runs it: ``python -m asr.train ...`` in a subprocess."""

import json
import os
import subprocess
import sys
import time

import pytest

from tests.helpers import TINY_MODEL, run_train


def metrics_of(cwd):
    (path,) = cwd.glob("outputs/*/*/metrics.json")
    return json.loads(path.read_text())


def demo_run(root):
    """The demo experiment on the small fixture corpus (read as a plain tree, not rebuilt), for one batch."""
    return ["experiment=demo", f"data.root={root}", "data/source=folder", "trainer.fast_dev_run=true", *TINY_MODEL]


def test_fast_dev_run(demo_root, tmp_path):
    result = run_train(*demo_run(demo_root), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = metrics_of(tmp_path)
    for key in ("test/wer", "test/cer", "test/test-seen/wer", "test/test-unseen/wer", "val/wer", "train/loss"):
        assert key in metrics
    splits = [
        value
        for key, value in metrics.items()
        if key.startswith("test/") and key.endswith("/wer") and key.count("/") == 2
    ]
    assert len(splits) == 5 and metrics["test/wer"] == pytest.approx(sum(splits) / len(splits))


def test_runs_without_a_logger(demo_root, tmp_path):
    result = run_train(*demo_run(demo_root), "~logger", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not list(tmp_path.glob("outputs/*/*/csv"))
    assert "test/wer" in metrics_of(tmp_path)


def test_without_data_or_network_fails_fast_with_instructions(tmp_path):
    start = time.time()
    result = run_train(
        f"data.root={tmp_path / 'nowhere'}", cwd=tmp_path, timeout=120, env={"HF_HOME": str(tmp_path / "hf")}
    )
    assert result.returncode != 0
    assert time.time() - start < 60
    message = result.stderr
    assert "LibriSpeech is missing" in message and "train-clean-100" in message
    assert "facebook/hubert-large-ll60k" in message and "not in the Hugging Face cache" in message
    assert "experiment=demo" in message
    assert "Traceback" not in message


def test_model_card_config_prints(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "asr.train", "experiment=hubert_large_ls100h", "--cfg", "job"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for line in (
        "pretrained: facebook/hubert-large-ll60k",
        "lr: 0.0003",
        "warmup_steps: 500",
        "max_epochs: 3",
        "precision: 16-mixed",
        "batch_size: 4",
        "seed: 42",
    ):
        assert line in result.stdout


def test_the_checkpoint_metrics_json_names_reproduces_its_test_metrics(demo_root, tmp_path):
    """Training stopped mid-epoch by max_steps: the tested weights are on disk, and evaluating them gives the run's
    test metrics exactly (the ModelCheckpoint of the last validation holds older weights)."""
    data = ["experiment=demo", f"data.root={demo_root}", "data/source=folder", "trainer.max_time=null"]
    result = run_train(*data, "trainer.max_steps=5", *TINY_MODEL, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = metrics_of(tmp_path)
    checkpoint = metrics["checkpoint"]
    assert checkpoint.endswith("checkpoints/final.ckpt") and os.path.isfile(checkpoint)
    evaluated = subprocess.run(
        [sys.executable, "-m", "asr.evaluate", *data, f"ckpt_path={checkpoint}", "evaluate.progress_bar=false"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    (path,) = tmp_path.glob("outputs/evaluate/*/*/evaluate.json")
    report = json.loads(path.read_text())
    for split in ("test-seen", "test-unseen"):
        for name in ("wer", "cer", "loss"):
            assert report["splits"][split][name] == metrics[f"test/{split}/{name}"], (split, name)


def test_a_bad_checkpoint_to_resume_from_or_one_to_overwrite_stops_with_a_message(demo_root, tmp_path):
    text = tmp_path / "text.ckpt"
    text.write_text("not a checkpoint\n")
    result = run_train(*demo_run(demo_root), f"ckpt_path={text}", cwd=tmp_path, timeout=300)
    assert result.returncode == 1
    assert f"ckpt_path={text}: not a readable checkpoint: not a file torch.save writes" in result.stderr
    assert "Traceback" not in result.stderr
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "step5.ckpt").write_bytes(b"")
    result = run_train(*demo_run(demo_root), f"hydra.run.dir={run_dir}", cwd=tmp_path, timeout=300)
    assert result.returncode == 1
    assert "holds checkpoints already (step5.ckpt): resume them with ckpt_path=last" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_run_folder_of_a_slurm_job_is_named_after_it(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "asr.train", "--cfg", "hydra", "-p", "hydra.run.dir"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "SLURM_JOB_ID": "4242"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "outputs/4242"
