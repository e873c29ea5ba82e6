"""The notebooks (notebooks/*.ipynb) run, plots included, on a tiny demo run and its evaluation; what they show is
computed by asr.analysis, checked here on constructed inputs."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell

from asr import analysis
from asr.analysis import Prediction
from asr.data.librispeech import Utterance
from tests.helpers import TINY_MODEL

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def run(entry_point: str, *overrides: str, cwd: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", entry_point, *overrides],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(demo_root, tmp_path_factory) -> Path:
    """A folder whose outputs/ holds a tiny demo training run and an evaluation of the checkpoint its metrics.json
    names."""
    cwd = tmp_path_factory.mktemp("runs")
    data = ["experiment=demo", f"data.root={demo_root}", "data/source=folder"]
    # Two validations, a loss logged at every step, small batches.
    steps = [
        "trainer.max_steps=4",
        "trainer.max_time=null",
        "trainer.val_check_interval=2",
        "trainer.log_every_n_steps=1",
    ]
    run("asr.train", *data, *steps, "data.max_batch_seconds=6", *TINY_MODEL, cwd=cwd)
    (metrics,) = cwd.glob("outputs/*/*/metrics.json")
    checkpoint = json.loads(metrics.read_text())["checkpoint"]
    run("asr.evaluate", *data, f"ckpt_path={checkpoint}", "evaluate.progress_bar=false", cwd=cwd)
    return cwd


def execute(name: str, cwd: Path, **parameters) -> list[dict]:
    """The outputs of notebooks/<name>.ipynb run in ``cwd``, with ``parameters`` set in a cell after its parameters
    cell (as papermill does); a cell that raises fails the test."""
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    (index,) = [k for k, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])]
    notebook.cells.insert(index + 1, new_code_cell("\n".join(f"{k} = {v!r}" for k, v in parameters.items())))
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return [output for cell in notebook.cells for output in cell.get("outputs", [])]


def plots(outputs: list[dict]) -> int:
    return sum("image/png" in output.get("data", {}) for output in outputs)


def text(outputs: list[dict]) -> str:
    return "\n".join(output.get("text", "") + output.get("data", {}).get("text/markdown", "") for output in outputs)


@pytest.fixture(autouse=True)
def kernel_environment(monkeypatch):
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend, which sends the plots
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_the_notebooks_hold_no_outputs():
    for path in NOTEBOOKS.glob("*.ipynb"):
        notebook = nbformat.read(path, as_version=4)
        assert not [cell for cell in notebook.cells if cell.get("outputs") or cell.get("execution_count")], path


def test_data(demo_root, tmp_path):
    outputs = execute("data", tmp_path, OVERRIDES=["experiment=demo", f"data.root={demo_root}", "data/source=folder"])
    assert plots(outputs) == 3
    shown = text(outputs)
    for split in ("train", "dev", "test-seen", "test-unseen"):
        assert f"| {split} |" in shown


def test_results_of_the_newest_run_found_from_a_subfolder(runs):
    """Run from ``notebooks/`` next to ``outputs/``, as Jupyter runs it, with no parameter set."""
    (run_dir,) = (p.parent for p in runs.glob("outputs/*/*/metrics.json"))
    (runs / "notebooks").mkdir(exist_ok=True)
    outputs = execute("results", runs / "notebooks")
    assert plots(outputs) == 2
    shown = text(outputs)
    assert f"{run_dir}: " in shown and "train/loss" in shown and "val/dev/wer" in shown
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert analysis.markdown_table(analysis.split_metrics(metrics)) in shown


def test_errors(runs):
    (evaluated,) = runs.glob("outputs/evaluate/*/*")
    predictions = evaluated / "predictions.jsonl"
    assert predictions.is_file(), f"asr.evaluate wrote no {predictions.name} in its run folder {evaluated}"
    outputs = execute("errors", runs, RUN=str(evaluated))
    assert plots(outputs) == 2
    report = json.loads((evaluated / "evaluate.json").read_text())
    for row in analysis.error_summary(analysis.read_predictions(evaluated)):
        assert row["wer"] == pytest.approx(report["splits"][row["split"]]["wer"]), row["split"]


def test_a_missing_run_is_named_with_how_to_make_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no outputs/ folder at or above .*python -m asr.train"):
        analysis.newest_run("train")
    (tmp_path / "outputs" / "a").mkdir(parents=True)
    (tmp_path / "outputs" / "a" / "metrics.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"No evaluate run found \(under .*outputs\).*python -m asr.evaluate"):
        analysis.newest_run("evaluate")


def test_the_newest_run_of_each_kind(tmp_path, monkeypatch):
    outputs = tmp_path / "outputs"
    files = [
        "2026-01-01/10-00-00/metrics.json",
        "2026-01-02/10-00-00/csv/version_0/metrics.csv",  # a run still going: logs, no metrics.json yet
        "evaluate/2026-01-03/10-00-00/predictions.jsonl",
        "evaluate/2026-01-04/10-00-00/evaluate.json",  # no predictions
    ]
    for age, name in enumerate(files):
        (outputs / name).parent.mkdir(parents=True)
        (outputs / name).write_text("")
        os.utime(outputs / name, (1000 + age, 1000 + age))
    monkeypatch.chdir(tmp_path)
    assert analysis.newest_run("train") == outputs / "2026-01-02/10-00-00"
    assert analysis.newest_run("evaluate") == outputs / "evaluate/2026-01-03/10-00-00"
    wandb_log = outputs / "2026-01-05/10-00-00/wandb/offline-run-20260105_100000-abc/run-abc.wandb"
    wandb_log.parent.mkdir(parents=True)
    wandb_log.write_bytes(b"")
    assert analysis.newest_run("train") == outputs / "2026-01-05/10-00-00"


def test_csv_history_joins_the_versions_and_skips_empty_cells(tmp_path):
    for version, rows in enumerate(
        [
            "epoch,step,train/loss,val/wer\n0,0,5.0,\n0,1,4.0,\n0,1,,0.9\n",
            "epoch,step,train/loss,val/wer,test/wer\n1,2,3.0,,\n1,2,,,0.8\n",
        ]
    ):
        (tmp_path / "csv" / f"version_{version}").mkdir(parents=True)
        (tmp_path / "csv" / f"version_{version}" / "metrics.csv").write_text(rows)
    curves = analysis.history(tmp_path)
    assert curves == {"train/loss": ([0, 1, 2], [5.0, 4.0, 3.0]), "val/wer": ([1], [0.9]), "test/wer": ([2], [0.8])}
    assert list(analysis.curves_of(curves, "wer")) == ["val/wer"]


def test_wandb_history_reads_what_lightning_logged_offline(tmp_path):
    """The run log of Lightning's WandbLogger (offline), with a config record larger than a log block."""
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(project="asr", save_dir=str(tmp_path), offline=True)
    logger.log_hyperparams({"big": "x" * 70_000})
    logged = {"train/loss": ([], []), "val/dev/wer": ([], [])}
    for step in range(300):
        metrics = {"train/loss": 10.0 / (step + 1)} if step % 7 else {"train/loss": 1.0, "val/dev/wer": step / 300}
        logger.log_metrics(metrics, step=step)
        for key, value in metrics.items():
            logged[key][0].append(step)
            logged[key][1].append(value)
    logger.experiment.finish()
    wandb.teardown()  # finish() can return before the W&B service has written the log's end; this waits for it
    (log,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    assert log.stat().st_size > 2 * analysis.BLOCK
    assert analysis.history(tmp_path) == logged

    data = bytearray(log.read_bytes())
    log.write_bytes(data[: len(data) * 2 // 3])  # cut short, as a run still writing
    steps, _ = analysis.history(tmp_path)["train/loss"]
    assert 0 < len(steps) < 300 and steps == logged["train/loss"][0][: len(steps)]
    data[data.index(b"x" * 100) + 50] ^= 0xFF  # a byte of the config record
    log.write_bytes(data)
    with pytest.raises(ValueError, match=re.escape(f"{log}: corrupt W&B run log")):
        analysis.history(tmp_path)
    log.write_bytes(b"not a log")
    with pytest.raises(ValueError, match=re.escape(f"{log}: not a W&B run log")):
        analysis.history(tmp_path)


def test_a_run_without_logs_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path}: no CSV logs")):
        analysis.history(tmp_path)


def test_split_metrics():
    metrics = {"test/wer": 0.5, "test/b/wer": 0.4, "test/a/wer": 0.6, "test/a/cer": 0.2, "val/a/loss": 3.0}
    assert analysis.split_metrics({**metrics, "checkpoint": "final.ckpt", "train/loss": 1.0}) == [
        {"stage": "test", "split": "a", "wer": 0.6, "cer": 0.2, "loss": None},
        {"stage": "test", "split": "b", "wer": 0.4, "cer": None, "loss": None},
        {"stage": "val", "split": "a", "wer": None, "cer": None, "loss": 3.0},
    ]


def test_corpus_counts():
    utterances = [
        Utterance("1-1-0", "a.flac", "HELLO WORLD", "1", 16_000, 16_000),
        Utterance("2-1-0", "b.flac", "HELLO", "2", 32_000, 16_000),
        Utterance("2-1-1", "c.flac", "OK", "2", 8_000, 16_000),
    ]
    assert analysis.durations(utterances) == [1.0, 2.0, 0.5]
    assert analysis.speaker_counts(utterances) == {"2": 2, "1": 1}
    assert analysis.word_counts(utterances) == {"HELLO": 2, "WORLD": 1, "OK": 1}
    assert analysis.char_counts(utterances)["L"] == 5 and " " not in analysis.char_counts(utterances)
    (row,) = analysis.corpus_summary({"dev": utterances})
    assert row == {
        "split": "dev",
        "utterances": 3,
        "hours": 0.0,
        "speakers": 2,
        "shortest": 0.5,
        "mean": 1.17,
        "longest": 2.0,
        "words": 4,
        "distinct words": 3,
    }


def prediction(split, id, reference, hypothesis, s, d, i, seconds):
    return Prediction(split, id, reference, hypothesis, len(reference.split()), s, d, i, seconds)


PREDICTIONS = [
    prediction("a", "1", "THE CAT SAT", "THE CAT SAT", 0, 0, 0, 1.0),
    prediction("a", "2", "THE DOG", "A DOG RAN", 1, 0, 1, 2.0),
    prediction("b", "3", "A B C D", "A X C", 1, 1, 0, 3.0),
    prediction("b", "4", "THE END", "A END", 1, 0, 0, 4.0),
]


def test_error_summary_worst_and_confusions():
    assert analysis.error_summary(PREDICTIONS) == [
        {"split": "a", "utterances": 2, "words": 5, "substitutions": 1, "deletions": 0, "insertions": 1, "wer": 0.4},
        {"split": "b", "utterances": 2, "words": 6, "substitutions": 2, "deletions": 1, "insertions": 0, "wer": 0.5},
    ]
    assert [row["id"] for row in analysis.worst(PREDICTIONS, 3)] == ["2", "3", "4"]  # WER 1, then 0.5 with 2 errors
    assert analysis.confusions(PREDICTIONS, 1) == {
        "substitutions": [{"reference": "THE", "hypothesis": "A", "count": 2}],
        "deletions": [{"word": "D", "count": 1}],
        "insertions": [{"word": "RAN", "count": 1}],
    }


def test_wer_by_duration_buckets_of_about_as_many_utterances():
    rows = analysis.wer_by_duration(PREDICTIONS, buckets=2)
    assert [(row["from"], row["to"], row["utterances"], row["wer"]) for row in rows] == [
        (1.0, 3.0, 2, 0.4),
        (3.0, 4.0, 2, 0.5),
    ]
    assert sum(row["utterances"] for row in analysis.wer_by_duration(PREDICTIONS, buckets=10)) == 4
    assert analysis.wer_by_duration([], buckets=3) == []


def test_bad_predictions_are_named_by_file_and_line(tmp_path):
    good = json.dumps(vars(PREDICTIONS[0]))
    path = tmp_path / "predictions.jsonl"
    path.write_text(f"{good}\n{{not json\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}, line 2: not a prediction")):
        analysis.read_predictions(tmp_path)
    path.write_text(f"{good}\n{json.dumps({'split': 'a', 'id': '1'})}\n")
    with pytest.raises(ValueError, match=r"line 2: not a prediction \(missing deletions, hypothesis"):
        analysis.read_predictions(path)
    path.write_text(good + "\n")
    assert analysis.read_predictions(tmp_path) == PREDICTIONS[:1]
    with pytest.raises(FileNotFoundError, match="python -m asr.evaluate writes it"):
        analysis.read_predictions(tmp_path / "elsewhere")


def test_markdown_table():
    rows = [{"id": "a|b", "wer": 0.12345}, {"id": "c", "wer": 1.0}]
    assert analysis.markdown_table(rows) == "| id | wer |\n| --- | --- |\n| a\\|b | 0.123 |\n| c | 1 |"
    assert analysis.markdown_table([]) == "(none)"
