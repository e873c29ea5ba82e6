"""Loading a checkpoint: the architecture comes from the file, and a file that is not one gets a clear message."""

import functools

import pytest
import torch

from asr.checkpoint import load_recognizer
from asr.model import SpeechRecognizer
from tests.helpers import TINY_HUBERT


def test_a_checkpoint_rebuilds_its_model_without_the_hub(tmp_path, tokenizer):
    import lightning as L

    model = SpeechRecognizer(
        tokenizer,
        functools.partial(torch.optim.AdamW, lr=1e-3),
        config=TINY_HUBERT,
        freeze_feature_encoder=False,
        test_splits=["a"],
    )
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, max_steps=0)
    trainer.strategy.connect(model)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    loaded = load_recognizer(path, tokenizer, runtime={"packed": False, "hidden_size": 999}, test_splits=["b"])
    assert loaded.splits["test"] == ["b"]
    assert loaded.backbone.config.hidden_size == TINY_HUBERT["hidden_size"]  # not a runtime key
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor)


@pytest.mark.parametrize("content", [b"not a checkpoint\n", b"PK\x03\x04 cut in half"], ids=["text", "truncated"])
def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path, tokenizer, content):
    path = tmp_path / "broken.ckpt"
    path.write_bytes(content)
    with pytest.raises(SystemExit, match=f"ckpt_path={path}: not a readable checkpoint"):
        load_recognizer(path, tokenizer)


def test_a_missing_checkpoint_is_named(tmp_path, tokenizer):
    with pytest.raises(SystemExit, match="no such file"):
        load_recognizer(tmp_path / "nowhere.ckpt", tokenizer)
