import subprocess
import sys

import pytest
import torch

from asr.data.datamodule import SpeechDataModule
from asr.data.librispeech import DataError
from tests.conftest import write_flac


def make_datamodule(root, tokenizer, **kwargs):
    defaults = dict(root=str(root), train_splits=["train"], val_splits=["dev"], test_splits=["test-seen"],
                    tokenizer=tokenizer, max_batch_seconds=10, eval_batch_size=4, num_workers=0)
    return SpeechDataModule(**{**defaults, **kwargs})


def test_batches_from_the_demo_corpus(demo_root, tokenizer):
    dm = make_datamodule(demo_root, tokenizer)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_values"].dtype == torch.float32
    assert batch["attention_mask"].sum() / 16000 <= 10
    lengths = batch["attention_mask"].sum(1)
    k = int(lengths.argmin())
    assert batch["input_values"][k, lengths[k]:].abs().sum() == 0
    assert tokenizer.decode(batch["labels"][0][: batch["label_lengths"][0]].tolist()) == batch["texts"][0]
    assert sum(len(b) for b in dm.val_dataloader()[0].batch_sampler) == len(dm._utterances["dev"])


def test_out_of_vocabulary_and_duration_filters_are_counted(tmp_path, tokenizer):
    chapter = tmp_path / "LibriSpeech" / "train" / "1" / "2"
    for k, seconds in enumerate([1.0, 1.0, 0.2, 1.0]):
        write_flac(chapter / f"1-2-{k}.flac", seconds)
    (chapter / "1-2.trans.txt").write_text("1-2-0 HELLO\n1-2-1 CAFÉ NOIR\n1-2-2 TOO SHORT\n1-2-3 FINE\n")
    dm = make_datamodule(tmp_path, tokenizer, min_duration=0.5)
    assert [u.id for u in dm.load_split("train", for_training=True)] == ["1-2-0", "1-2-3"]
    assert dm.skipped == {"train/characters outside the vocabulary": 1, "train/shorter than data.min_duration": 1}
    strict = make_datamodule(tmp_path, tokenizer, on_error="raise")
    with pytest.raises(DataError, match=r"1-2-1\.flac: characters outside the vocabulary \(É\)"):
        strict.load_split("train", for_training=True)


def test_inspect_command(demo_root):
    result = subprocess.run(
        [sys.executable, "-m", "asr.data", "inspect", "experiment=demo", f"data.root={demo_root}", "data.demo_corpus=null"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "train: " in result.stdout and "8 speakers" in result.stdout
    assert "test-unseen: 16 utterances" in result.stdout and "2 speakers" in result.stdout
    assert "skipped: 0" in result.stdout
