"""``python -m asr.evaluate``: a saved HF folder and a Lightning checkpoint, decoded on a tiny LibriSpeech."""

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import soundfile as sf
import torch
from torchmetrics.functional.text import word_error_rate

from asr.data.text import normalize
from asr.decoding import GreedyDecoder
from asr.model import SpeechRecognizer
from tests.helpers import TINY_HUBERT, write_flac

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("test-clean", "test-other")
TEXTS = ("HELLO WORLD", "A TEST", "SPEECH IS FUN")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("librispeech")
    for split in SPLITS:
        folder = root / "LibriSpeech" / split / "19" / "198"
        lines = []
        for k, text in enumerate(TEXTS):
            write_flac(folder / f"19-198-{k:04d}.flac", 0.6 + 0.3 * k)
            lines.append(f"19-198-{k:04d} {text}")
        (folder / "19-198.trans.txt").write_text("\n".join(lines) + "\n")
    return root


def run_evaluate(*overrides, cwd):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "asr.evaluate",
            *overrides,
            "trainer.accelerator=cpu",
            "trainer.precision=32-true",
            "data.num_workers=0",
            "evaluate.progress_bar=false",
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        },
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = cwd.glob("outputs/evaluate/*/*/evaluate.json")
    return json.loads(path.read_text())


def check_report(report):
    assert set(report["splits"]) == set(SPLITS)
    for values in report["splits"].values():
        assert 0 <= values["wer"] < math.inf and 0 <= values["cer"] < math.inf
    assert report["utterances"] == len(SPLITS) * len(TEXTS)
    seconds = len(SPLITS) * sum(0.6 + 0.3 * k for k in range(len(TEXTS)))
    assert report["audio_seconds"] == pytest.approx(seconds, rel=1e-3)
    assert report["audio_seconds_per_second"] > 0
    assert report["wer"] == pytest.approx(sum(v["wer"] for v in report["splits"].values()) / len(SPLITS))


def test_evaluates_a_saved_pretrained_folder(tree, tiny_pretrained, tmp_path):
    report = run_evaluate(
        f"model.pretrained={tiny_pretrained}",
        f"data.root={tree}",
        f"data.test_splits=[{','.join(SPLITS)}]",
        "data.eval_batch_size=2",
        cwd=tmp_path,
    )
    check_report(report)
    assert report["model"] == str(tiny_pretrained)


def test_evaluates_a_lightning_checkpoint_with_its_own_architecture(tree, tokenizer, tmp_path):
    """The checkpoint alone rebuilds the model (no hub); decoding gives the WER the saved module gives."""
    torch.manual_seed(0)
    config = {**TINY_HUBERT, "feat_extract_norm": "layer", "do_stable_layer_norm": True}
    module = SpeechRecognizer(
        tokenizer=tokenizer,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
        config=config,
        freeze_feature_encoder=False,
        test_splits=list(SPLITS),
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    checkpoint = torch.load(tmp_path / "model.ckpt", weights_only=False)
    assert checkpoint["backbone_config"]["hidden_size"] == TINY_HUBERT["hidden_size"]

    report = run_evaluate(
        f"ckpt_path={tmp_path / 'model.ckpt'}",
        f"data.root={tree}",
        f"data.test_splits=[{','.join(SPLITS)}]",
        "data.eval_batch_size=1",
        cwd=tmp_path,
    )
    check_report(report)

    # The same weights decoded here, one utterance at a time, give the same error rates.
    module.eval()
    for split in SPLITS:
        folder = tree / "LibriSpeech" / split / "19" / "198"
        hypotheses = []
        for k in range(len(TEXTS)):
            audio, _ = sf.read(folder / f"19-198-{k:04d}.flac", dtype="float32")
            audio = (audio - audio.mean()) / (audio.var() + 1e-7) ** 0.5
            x = torch.from_numpy(audio)[None]
            with torch.no_grad():
                logits, lengths = module(x, torch.ones_like(x, dtype=torch.bool))
            hypotheses += GreedyDecoder(tokenizer)(logits, lengths)
        expected = float(word_error_rate(hypotheses, [normalize(t) for t in TEXTS]))
        assert report["splits"][split]["wer"] == pytest.approx(expected, abs=1e-6)
