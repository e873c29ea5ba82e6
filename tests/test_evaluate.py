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
from asr.scoring import Confusions, Counts, align
from tests.helpers import TINY_HUBERT, write_flac

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("test-clean", "test-other")
TEXTS = ("HELLO WORLD", "A TEST", "SPEECH IS FUN")
FIELDS = ["split", "id", "reference", "hypothesis", "words", "substitutions", "deletions", "insertions", "seconds"]


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
    """Runs the command in ``cwd``; its evaluate.json, the lines of its predictions.jsonl, and what it printed."""
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
    report = json.loads(path.read_text())
    assert report["predictions"] == str(path.parent / "predictions.jsonl")
    lines = path.with_name("predictions.jsonl").read_text().splitlines()
    return report, [json.loads(line) for line in lines], result.stdout


def check_report(report, predictions):
    assert set(report["splits"]) == set(SPLITS)
    for values in report["splits"].values():
        assert 0 <= values["wer"] < math.inf and 0 <= values["cer"] < math.inf
    assert report["utterances"] == len(SPLITS) * len(TEXTS)
    seconds = len(SPLITS) * sum(0.6 + 0.3 * k for k in range(len(TEXTS)))
    assert report["audio_seconds"] == pytest.approx(seconds, rel=1e-3)
    assert report["audio_seconds_per_second"] > 0
    assert report["wer"] == pytest.approx(sum(v["wer"] for v in report["splits"].values()) / len(SPLITS))
    check_predictions(report, predictions)


def check_predictions(report, predictions):
    """Every utterance once, with its reference, duration and error counts; the split's counts are their sums and
    give its WER; the confusions are those of the predictions."""
    assert [(p["split"], p["id"]) for p in predictions] == [
        (split, f"19-198-{k:04d}") for split in SPLITS for k in range(len(TEXTS))
    ]
    confusions = {split: Confusions() for split in (*SPLITS, "all")}
    for p in predictions:
        assert list(p) == FIELDS
        k = int(p["id"][-4:])
        assert p["reference"] == normalize(TEXTS[k]) and p["seconds"] == pytest.approx(0.6 + 0.3 * k, abs=1e-4)
        pairs = align(p["reference"], p["hypothesis"])
        assert Counts(p["words"], p["substitutions"], p["deletions"], p["insertions"]) == Counts.of(pairs)
        confusions[p["split"]].add(pairs)
        confusions["all"].add(pairs)
    assert report["confusions"] == confusions["all"].top(20)
    for split, values in report["splits"].items():
        rows = [p for p in predictions if p["split"] == split]
        counts = sum((Counts(p["words"], p["substitutions"], p["deletions"], p["insertions"]) for p in rows), Counts())
        assert counts == Counts(values["words"], values["substitutions"], values["deletions"], values["insertions"])
        assert counts.words == sum(len(t.split()) for t in TEXTS)
        assert values["wer"] == pytest.approx(counts.wer, rel=1e-6)  # the logged (torchmetrics) WER
        assert values["utterances"] == len(TEXTS)
        assert values["audio_seconds"] == pytest.approx(sum(p["seconds"] for p in rows))
        assert values["confusions"] == confusions[split].top(20)


def test_evaluates_a_saved_pretrained_folder(tree, tiny_pretrained, tmp_path):
    report, predictions, _ = run_evaluate(
        f"model.pretrained={tiny_pretrained}",
        f"data.root={tree}",
        f"data.test_splits=[{','.join(SPLITS)}]",
        "data.eval_batch_size=2",
        cwd=tmp_path,
    )
    check_report(report, predictions)
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

    report, predictions, printed = run_evaluate(
        f"ckpt_path={tmp_path / 'model.ckpt'}",
        f"data.root={tree}",
        f"data.test_splits=[{','.join(SPLITS)}]",
        "data.eval_batch_size=1",
        cwd=tmp_path,
    )
    check_report(report, predictions)
    for split, values in report["splits"].items():
        counts = f"{values['substitutions']:8d}{values['deletions']:8d}{values['insertions']:8d}{values['words']:9d}"
        assert f"{split:<16}{values['wer']:8.4f}{counts}" in printed
    assert "Most frequent substitutions (reference -> hypothesis): " in printed

    # The same weights decoded here, one utterance at a time, give the same transcripts and error rates.
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
        assert [p["hypothesis"] for p in predictions if p["split"] == split] == hypotheses
        expected = float(word_error_rate(hypotheses, [normalize(t) for t in TEXTS]))
        assert report["splits"][split]["wer"] == pytest.approx(expected, abs=1e-6)


def test_two_ddp_ranks_decode_every_utterance_once_and_give_the_one_process_results(tree, tiny_pretrained, tmp_path):
    """A batch per utterance: 3 batches a split, so rank 1 gets an empty one. Rank 0 gathers both ranks' predictions
    (each utterance once) and writes what one process writes."""
    common = [
        f"model.pretrained={tiny_pretrained}",
        f"data.root={tree}",
        f"data.test_splits=[{','.join(SPLITS)}]",
        "data.eval_batch_size=1",
    ]
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one, one_predictions, _ = run_evaluate(*common, cwd=tmp_path / "one")
    two, two_predictions, printed = run_evaluate(
        *common, "trainer.devices=2", "trainer.strategy=ddp", cwd=tmp_path / "two"
    )
    check_report(two, two_predictions)
    assert two_predictions == one_predictions
    for split in SPLITS:
        # The mean loss only up to rounding: the ranks' sums are added in another order.
        assert two["splits"][split].pop("loss") == pytest.approx(one["splits"][split].pop("loss"), rel=1e-6)
        assert two["splits"][split] == one["splits"][split], split
    assert (two["wer"], two["cer"], two["confusions"]) == (one["wer"], one["cer"], one["confusions"])
    assert printed.count("Most frequent substitutions") == 1  # rank 0 prints, rank 1 does not
