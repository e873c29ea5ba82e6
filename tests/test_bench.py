"""``python -m asr.bench``: the corpus, the meter, and a CPU smoke run of both arms (code path only)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch

from asr.bench import Meter, write_corpus

ROOT = Path(__file__).resolve().parents[1]


def test_corpus_is_librispeech_layout_flac_and_reused(tmp_path):
    from omegaconf import OmegaConf

    spec = OmegaConf.create(
        {"root": str(tmp_path), "hours": 0.01, "test_hours": 0.0, "seed": 3, "duration_scale": 0.1, "workers": 1}
    )
    root = write_corpus(spec)
    index = json.loads((root / "index-train-clean-100.json").read_text())
    assert len(index) == round(0.01 * 3600 / 1.27)
    path, text, samples = index[0]
    info = sf.info(path)
    assert info.samplerate == 16_000 and info.frames == samples and info.format == "FLAC"
    trans = Path(path).parent / f"{Path(path).stem.rsplit('-', 1)[0]}.trans.txt"
    assert f"{Path(path).stem} {text}" in trans.read_text().splitlines()
    assert (root / "LibriSpeech" / "dev-clean").is_dir()
    mtime = Path(path).stat().st_mtime_ns
    assert write_corpus(spec) == root and Path(path).stat().st_mtime_ns == mtime


def test_meter_counts_only_the_measured_steps():
    meter = Meter(warmup=2, steps=3, device=torch.device("cpu"))
    meter.start()
    done = []
    for step in range(5):
        meter.batch(torch.ones(2, 16_000 * (step + 1), dtype=torch.bool))
        done.append(meter.step_end())
    assert done == [False, False, False, False, True]
    result = meter.result()
    assert result["audio_seconds_per_step"] == pytest.approx((3 + 4 + 5) * 2 / 3)
    assert result["utterances_per_step"] == 2 and result["padding_fraction"] == 0
    assert result["audio_seconds_per_second"] > 0


def test_bench_runs_both_arms_and_reports_the_ratio(tmp_path):
    overrides = [
        "model=hubert_tiny",
        "model.config.hidden_size=32",
        "model.config.num_hidden_layers=1",
        "model.config.intermediate_size=64",
        "model.config.num_attention_heads=2",
        "model.config.mask_time_prob=0.05",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        "data.num_workers=0",
        "data.batch_size=null",
        "data.max_batch_seconds=5",
        f"bench.corpus.root={tmp_path / 'corpus'}",
        "bench.corpus.hours=0.01",
        "bench.corpus.duration_scale=0.1",
        "bench.corpus.workers=1",
        "bench.warmup_steps=1",
        "bench.steps=2",
        "bench.baseline=hf_trainer",
        "bench.hf.num_workers=0",
        "bench.progress_bar=false",
        "bench.flops_seconds=1",
        '+bench.variants.packed="+model.packed=true model.config.attention_dropout=0.0 optimizer.fused=true"',
    ]
    result = subprocess.run(
        [sys.executable, "-m", "asr.bench", *overrides],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        },
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = tmp_path.glob("outputs/bench/*/*/bench.json")
    report = json.loads(path.read_text())
    arms = report["arms"]
    assert set(arms) == {"hf_trainer", "ours", "packed"}
    for name, arm in arms.items():
        assert "error" not in arm, (name, arm.get("error"))
        assert arm["audio_seconds_per_second"] > 0 and arm["step_time_ms"] > 0
        assert arm["steps"] == 2 and arm["flops_per_audio_second"] > 0
    assert arms["hf_trainer"]["utterances_per_step"] == 4
    assert arms["packed"]["settings"]["packed"] is True and arms["packed"]["settings"]["fused"] is True
    for name in ("ours", "packed"):
        assert arms[name]["ratio_to_hf_trainer"] == pytest.approx(
            arms[name]["audio_seconds_per_second"] / arms["hf_trainer"]["audio_seconds_per_second"]
        )
    assert report["corpus"]["train-clean-100"]["utterances"] == 28
    assert "x HF" in result.stdout and "packed" in result.stdout
