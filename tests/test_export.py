"""``python -m asr.export``: a folder that transformers' pipeline loads with no code of ours and that transcribes as
``asr.transcribe`` does, evaluates as its checkpoint does, and carries a model card filled from the run's logs."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import AutoModelForCTC

from asr import transcribe
from asr.config import compose
from asr.data.text import CharTokenizer
from asr.export import export
from asr.model import SpeechRecognizer
from tests.helpers import TINY_HUBERT, TINY_MODEL

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def run(module, *args, cwd, timeout=600):
    command = [sys.executable, "-m", module, *map(str, args)]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def data(demo_root):
    return ["experiment=demo", f"data.root={demo_root}", "data/source=folder", *TINY_MODEL]


@pytest.fixture(scope="module")
def run_dir(demo_root, tmp_path_factory):
    """A run of asr.train: 4 steps, validated every 2, with its config, CSV logs, metrics.json and checkpoints."""
    cwd = tmp_path_factory.mktemp("train")
    steps = ["trainer.max_time=null", "trainer.max_steps=4", "trainer.val_check_interval=2"]
    logging = ["trainer.check_val_every_n_epoch=null", "trainer.log_every_n_steps=1"]
    run("asr.train", *data(demo_root), *steps, *logging, cwd=cwd)
    (folder,) = cwd.glob("outputs/*/*/")
    return folder


@pytest.fixture(scope="module")
def crafted(run_dir):
    """The run's final weights with a random CTC head (<s>, </s> and <unk> never best, as in a trained one): long,
    varied transcripts where 4 steps of training give blanks. Next to the run's checkpoints, so it has their run."""
    checkpoint = torch.load(run_dir / "checkpoints" / "final.ckpt", weights_only=False)
    state = checkpoint["state_dict"]
    generator = torch.Generator().manual_seed(0)
    state["backbone.lm_head.weight"] = torch.randn(state["backbone.lm_head.weight"].shape, generator=generator)
    state["backbone.lm_head.bias"][1:4] = -1e4
    path = run_dir / "checkpoints" / "crafted.ckpt"
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def exported(crafted, tmp_path_factory):
    return export(compose("export", [f"ckpt_path={crafted}", f"out={tmp_path_factory.mktemp('export') / 'model'}"]))


@pytest.fixture(scope="module")
def audio(demo_root):
    return sorted(str(p) for p in (demo_root / "LibriSpeech" / "test-seen").rglob("*.flac"))


PIPELINE = """
import json, sys
import soundfile as sf
from transformers import pipeline

asr = pipeline("automatic-speech-recognition", model=sys.argv[1])
texts = []
for path in sys.argv[2:]:
    audio, rate = sf.read(path, dtype="float32")
    texts.append(asr({"raw": audio, "sampling_rate": rate})["text"])
print(json.dumps({"texts": texts, "asr": sorted(m for m in sys.modules if m.split(".")[0] == "asr")}))
"""


def transcripts(model, files, capsys) -> list[str]:
    assert transcribe.main([str(model), *files]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == files
    return [line.split("\t")[1] for line in lines]


def test_pipeline_transcribes_the_export_as_asr_does(exported, crafted, audio, tmp_path, capsys):
    """transformers alone (no asr module imported) loads the folder, and its pipeline's transcripts are the words of
    asr.transcribe's on the export, which are those of the checkpoint. (The pipeline's tokenizer keeps two spaces
    where the model puts a blank between two word delimiters; ours writes one.)"""
    result = subprocess.run(
        [sys.executable, "-c", PIPELINE, str(exported), *audio],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    piped = json.loads(result.stdout.splitlines()[-1])
    assert piped["asr"] == []
    ours = transcripts(exported, audio, capsys)
    assert ours == transcripts(crafted, audio, capsys)
    assert all(len(text) > 10 for text in ours) and sum(text.count(" ") for text in ours) > 10, ours
    assert [text.split() for text in piped["texts"]] == [text.split() for text in ours]


def test_evaluating_the_checkpoint_and_its_export_gives_the_same_results(exported, crafted, demo_root, tmp_path):
    common = [*data(demo_root), "data.num_workers=0", "evaluate.progress_bar=false"]
    reports = []
    for model in (f"ckpt_path={crafted}", f"model.pretrained={exported}"):
        cwd = tmp_path / model.partition("=")[0]
        cwd.mkdir()
        run("asr.evaluate", *common, model, cwd=cwd)
        (folder,) = cwd.glob("outputs/evaluate/*/*/")
        report = json.loads((folder / "evaluate.json").read_text())
        predictions = folder / "predictions.jsonl"
        reports.append((report["splits"], predictions.read_text() if predictions.exists() else None))
    (checkpoint_splits, checkpoint_predictions), (export_splits, export_predictions) = reports
    assert set(checkpoint_splits) == {"test-seen", "test-unseen", "test-fast", "test-noisy", "test-accents"}
    assert checkpoint_splits["test-seen"]["cer"] != 1.0  # not all blank
    assert export_splits == checkpoint_splits
    assert export_predictions == checkpoint_predictions


def test_the_folder_holds_a_standard_processor(exported):
    names = {p.name for p in exported.iterdir()}
    assert {"model.safetensors", "config.json", "vocab.json", "tokenizer_config.json", "README.md"} <= names
    assert json.loads((exported / "vocab.json").read_text()) == CharTokenizer().token_to_id
    tokenizer = json.loads((exported / "tokenizer_config.json").read_text())
    assert tokenizer["tokenizer_class"] == "Wav2Vec2CTCTokenizer"
    assert (tokenizer["pad_token"], tokenizer["word_delimiter_token"]) == ("<pad>", "|")
    processor = json.loads((exported / "processor_config.json").read_text())
    features = processor.get("feature_extractor", processor)
    assert features["do_normalize"] and features["return_attention_mask"] and features["sampling_rate"] == 16_000


def card_rows(card: str) -> list[list[str]]:
    table = card.split("### Training results\n\n")[1].split("\n\n")[0].splitlines()
    cells = [[cell.strip() for cell in line.split("|")[1:-1]] for line in table]
    assert cells[0] == ["Training Loss", "Epoch", "Step", "Validation Loss", "Wer"]
    return cells[2:]


def test_the_model_card_is_filled_from_the_run(exported, run_dir, tmp_path):
    card = (exported / "README.md").read_text()
    (log,) = run_dir.glob("csv/version_*/metrics.csv")
    logged = list(csv.DictReader(log.open()))
    validations = [row for row in logged if row["val/wer"]]
    rows = card_rows(card)
    assert [row[2] for row in rows] == ["2", "4"]
    for row, logged_row in zip(rows, validations, strict=True):
        assert float(row[3]) == pytest.approx(float(logged_row["val/dev/loss"]), abs=1e-4)
        assert float(row[4]) == pytest.approx(float(logged_row["val/wer"]), abs=1e-4)
    last_train_loss = [row["train/loss"] for row in logged if row["train/loss"] and int(row["step"]) <= 3][-1]
    assert float(rows[-1][0]) == pytest.approx(float(last_train_loss), abs=1e-4)
    for line in (
        "This model was trained from scratch",
        "- learning_rate: 0.003",
        "- train_batch_seconds: 12",
        "- seed: 1234",
        "- optimizer: AdamW with betas=(0.9,0.98) and epsilon=1e-06 and weight_decay=0.01",
        "- training_steps: 4",
        "## Model description",
        "- Transformers ",
        "- Pytorch ",
        "library_name: transformers",
    ):
        assert line in card, line
    # metrics.json's test results are those of final.ckpt, not of these weights.
    assert "On the test splits" not in card
    out = export(compose("export", [f"ckpt_path={run_dir / 'checkpoints' / 'final.ckpt'}", f"out={tmp_path / 'f'}"]))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert f"- test-seen Wer: {metrics['test/test-seen/wer']:.4f}" in (out / "README.md").read_text()


def test_a_run_without_logs_or_config_gets_a_card_that_says_so(run_dir, tmp_path):
    bare = tmp_path / "run" / "checkpoints" / "final.ckpt"
    bare.parent.mkdir(parents=True)
    shutil.copy(run_dir / "checkpoints" / "final.ckpt", bare)
    card = (export(compose("export", [f"ckpt_path={bare}", f"out={tmp_path / 'a'}"])) / "README.md").read_text()
    assert "No training logs: the run folder" in card and "has no CSV logs" in card
    assert "| Training Loss |" not in card
    assert "More information needed (the run's config" in card
    shutil.copytree(run_dir / ".hydra", tmp_path / "run" / ".hydra")
    card = (export(compose("export", [f"ckpt_path={bare}", f"out={tmp_path / 'b'}"])) / "README.md").read_text()
    assert "No training logs" in card and "- learning_rate: 0.003" in card


def test_the_command_exports_and_refuses_what_is_not_a_checkpoint(run_dir, tmp_path):
    final = run_dir / "checkpoints" / "final.ckpt"
    result = run("asr.export", f"ckpt_path={final}", "out=model", cwd=tmp_path)
    assert result.stdout.splitlines()[-1] == "model" and (tmp_path / "model" / "model.safetensors").is_file()
    with pytest.raises(SystemExit, match="a folder; asr.export takes a Lightning checkpoint"):
        export(compose("export", [f"ckpt_path={run_dir}", f"out={tmp_path / 'x'}"]))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep")
    with pytest.raises(SystemExit, match="neither empty nor an earlier export"):
        export(compose("export", [f"ckpt_path={final}", f"out={tmp_path / 'other'}"]))


def test_a_packed_model_exports_with_standard_attention(tmp_path, tokenizer):
    model = SpeechRecognizer(tokenizer, None, config={**TINY_HUBERT, "attention_dropout": 0.0}, packed=True)
    assert model.backbone.config._attn_implementation == "asr_packed"
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, max_steps=0)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "packed.ckpt")
    out = export(compose("export", [f"ckpt_path={tmp_path / 'packed.ckpt'}", f"out={tmp_path / 'out'}"]))
    assert "asr_packed" not in (out / "config.json").read_text()
    assert AutoModelForCTC.from_pretrained(out).config._attn_implementation == "sdpa"


def test_out_may_be_an_earlier_export(exported, crafted):
    assert export(compose("export", [f"ckpt_path={crafted}", f"out={exported}"])) == Path(exported)
