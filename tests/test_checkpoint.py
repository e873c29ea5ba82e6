"""Loading a checkpoint: the architecture comes from the file, and a file that is not one gets a clear message."""

import functools
import json

import lightning as L
import pytest
import torch

from asr.checkpoint import load_recognizer, load_trained, save_export
from asr.model import SpeechRecognizer
from tests.helpers import TINY_HUBERT


def test_a_checkpoint_rebuilds_its_model_without_the_hub(tmp_path, tokenizer):
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


def saved(model, path):
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, max_steps=0)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(path)
    return path


def assert_same_weights(backbone, model):
    state = backbone.state_dict()
    for name, tensor in model.backbone.state_dict().items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0)


@pytest.mark.parametrize(("trained_packed", "loaded_packed"), [(True, False), (False, True)])
def test_a_checkpoint_loads_packed_or_not_as_asked(tmp_path, tokenizer, trained_packed, loaded_packed):
    config = {**TINY_HUBERT, "attention_dropout": 0.0}
    model = SpeechRecognizer(tokenizer, None, config=config, packed=trained_packed)
    path = saved(model, tmp_path / "model.ckpt")
    loaded = load_recognizer(path, tokenizer, runtime={"packed": loaded_packed})
    assert (loaded.packed_encoder is not None) == loaded_packed
    assert_same_weights(loaded.backbone, model)


def test_load_trained_takes_a_checkpoint_or_its_export(tmp_path, tokenizer):
    model = SpeechRecognizer(tokenizer, None, config={**TINY_HUBERT, "attention_dropout": 0.0}, packed=True)
    trained = load_trained(saved(model, tmp_path / "model.ckpt"))
    assert trained.backbone.config._attn_implementation == "sdpa"  # transformers' own, not the packed one
    assert not trained.backbone.training and (trained.step, trained.sample_rate) == (0, 16_000)
    assert_same_weights(trained.backbone, model)
    exported = load_trained(save_export(trained, tmp_path / "export"))
    assert exported.tokenizer.vocab == tokenizer.vocab and exported.sample_rate == 16_000
    assert exported.step is None and not exported.backbone.training
    assert_same_weights(exported.backbone, model)


def test_a_folder_that_is_not_a_model_is_named(tmp_path, tokenizer):
    with pytest.raises(SystemExit, match=f"{tmp_path}: not a model folder of asr.export"):
        load_trained(tmp_path)
    model = SpeechRecognizer(tokenizer, None, config=TINY_HUBERT)
    folder = save_export(load_trained(saved(model, tmp_path / "model.ckpt")), tmp_path / "export")
    vocab = json.loads((folder / "vocab.json").read_text())
    (folder / "vocab.json").write_text(json.dumps({k: v for k, v in vocab.items() if k != "Z"}))
    with pytest.raises(SystemExit, match="vocab.json does not match the model's CTC head"):
        load_trained(folder)
    (folder / "vocab.json").write_text(json.dumps({k: v for k, v in vocab.items() if k != "<pad>"}))
    with pytest.raises(SystemExit, match="not a readable model folder"):
        load_trained(folder)
