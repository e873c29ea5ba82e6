"""The demo learns: a short run in the default suite, the full recipe and its WER target as a slow test."""

import csv
import json
import os
import subprocess
import sys
import time

import pytest


def run(*overrides, cwd, timeout, env=None):
    return subprocess.run(
        [sys.executable, "-m", "asr.train", "experiment=demo", *overrides],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


def logged(cwd, key):
    (path,) = cwd.glob("outputs/*/*/csv/version_0/metrics.csv")
    with path.open() as f:
        return [float(row[key]) for row in csv.DictReader(f) if row.get(key)]


def test_short_demo_run_learns(demo_root, tmp_path):
    """A few minutes of audio, a few hundred steps: the model must get past the all-blank plateau."""
    result = run(
        f"data.root={demo_root}",
        "data/source=folder",
        "trainer.max_steps=550",
        "trainer.log_every_n_steps=10",
        "trainer.check_val_every_n_epoch=1000",
        "model.freeze_feature_encoder_after=null",
        "scheduler.warmup_steps=30",
        "scheduler.hold_fraction=0.9",
        "data.max_batch_seconds=6",
        "~callbacks.checkpoint",
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    losses = logged(tmp_path, "train/loss")
    # Random init starts above 3; a model that only predicts blanks plateaus near 3.
    assert losses[0] > 3.0, losses
    assert min(losses[-3:]) < 2.5, losses
    (metrics_file,) = tmp_path.glob("outputs/*/*/metrics.json")
    assert json.loads(metrics_file.read_text())["test/test-seen/cer"] < 0.85  # blanks only: 1.0


@pytest.mark.slow
def test_demo_reaches_the_target_wer(tmp_path):
    start = time.time()
    result = run(cwd=tmp_path, timeout=1200, env={"ASR_CACHE": str(tmp_path / "cache")})  # synthesis included
    elapsed = time.time() - start
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics_file,) = tmp_path.glob("outputs/*/*/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    print(json.dumps(metrics, indent=1), f"wall time {elapsed:.0f} s")
    # The target is 0.45 and its stretch goal 0.30.
    assert metrics["test/test-seen/wer"] <= 0.30
    assert elapsed <= 15 * 60


def test_an_interrupted_corpus_build_leaves_no_tree_and_is_redone(tmp_path, monkeypatch):
    from asr.data import demo

    cfg = demo.DemoCorpusConfig(train_hours=0.003, dev_utterances=2, test_utterances=2)

    def interrupted(*args, **kwargs):  # after the audio, at the first transcript
        raise KeyboardInterrupt

    monkeypatch.setattr(demo.Path, "write_text", interrupted)
    with pytest.raises(KeyboardInterrupt):
        demo.build_demo_corpus(tmp_path, cfg, workers=1)
    assert list((tmp_path / ".LibriSpeech.building").rglob("*.flac")) and not (tmp_path / "LibriSpeech").exists()

    monkeypatch.undo()
    tree = demo.build_demo_corpus(tmp_path, cfg, workers=1)
    assert any(tree.glob(".demo-*")) and len(list(tree.rglob("*.flac"))) > 6
    assert not (tmp_path / ".LibriSpeech.building").exists()


def test_runs_sharing_the_cache_build_the_corpus_once(tmp_path, monkeypatch):
    import threading

    from asr.data import demo

    cfg = demo.DemoCorpusConfig(train_hours=0.003, dev_utterances=2, test_utterances=2)
    build, builds = demo._build, []
    monkeypatch.setattr(demo, "_build", lambda *args: (builds.append(1), build(*args)))
    runs = [threading.Thread(target=demo.build_demo_corpus, args=(tmp_path, cfg, 1)) for _ in range(2)]
    for run_ in runs:
        run_.start()
    for run_ in runs:
        run_.join()
    assert builds == [1] and any((tmp_path / "LibriSpeech").glob(".demo-*"))
