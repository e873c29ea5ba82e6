"""Loading a checkpoint: the architecture comes from the file, and a file that is not one gets a clear message."""

import functools
import json

import lightning as L
import pytest
import torch

from asr.checkpoint import load_checkpoint, load_recognizer, load_trained, save_export
from asr.model import SpeechRecognizer
from tests.helpers import TINY_HUBERT, batch_of, quiet_trainer


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


def test_a_text_file_or_a_checkpoint_cut_in_half_is_named(tmp_path, tokenizer):
    path = tmp_path / "text.ckpt"
    path.write_text("not a checkpoint\n")
    with pytest.raises(SystemExit, match=f"ckpt_path={path}: not a readable checkpoint: not a file torch.save writes"):
        load_recognizer(path, tokenizer)
    whole = saved(SpeechRecognizer(tokenizer, None, config=TINY_HUBERT), tmp_path / "whole.ckpt").read_bytes()
    path = tmp_path / "half.ckpt"
    path.write_bytes(whole[: len(whole) // 2])
    for load in (functools.partial(load_recognizer, tokenizer=tokenizer), load_trained):
        with pytest.raises(SystemExit, match=f"ckpt_path={path}: not a readable checkpoint: cut short or damaged"):
            load(path)


class Payload:
    """What a hostile checkpoint could carry: unpickling it calls ``record`` (a function of this module)."""

    def __reduce__(self):
        return (record, ("ran",))


RAN: list[str] = []


def record(value: str) -> str:
    RAN.append(value)
    return value


def test_a_checkpoint_carrying_a_pickled_callable_is_refused_unrun(tmp_path, tokenizer):
    model = SpeechRecognizer(tokenizer, None, config=TINY_HUBERT)
    checkpoint = torch.load(saved(model, tmp_path / "model.ckpt"), weights_only=True)
    torch.save(
        {**checkpoint, "hyper_parameters": {**checkpoint["hyper_parameters"], "x": Payload()}}, tmp_path / "evil.ckpt"
    )
    path = tmp_path / "evil.ckpt"
    message = f"ckpt_path={path}: refused: it holds tests.test_checkpoint.record, code that loading would run"
    for load in (functools.partial(load_recognizer, tokenizer=tokenizer), load_trained, load_checkpoint):
        with pytest.raises(SystemExit, match=message):
            load(path)
    assert RAN == []


def test_what_asr_train_writes_needs_no_allow_list(tmp_path, tokenizer):
    """A fit's checkpoints (loops, callbacks, optimizer) hold nothing that weights_only=True refuses. (Those of
    ``python -m asr.train``, with its schedule and data position, are resumed with weights_only=True in
    tests/test_resume.py.)"""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from asr.callbacks import FinalCheckpoint

    model = SpeechRecognizer(
        tokenizer, functools.partial(torch.optim.AdamW, lr=1e-3), config=TINY_HUBERT, freeze_feature_encoder=False
    )
    batch = {**batch_of([torch.randn(16_000)], [tokenizer.encode("HELLO")]), "ids": ["u0"], "texts": ["HELLO"]}
    trainer = quiet_trainer(
        enable_checkpointing=True,
        max_steps=2,
        callbacks=[
            ModelCheckpoint(
                tmp_path,
                filename="step{step}",
                auto_insert_metric_name=False,
                monitor="step",
                mode="max",
                save_top_k=2,
                every_n_train_steps=1,
            ),
            FinalCheckpoint(str(tmp_path)),
        ],
    )
    trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader([batch] * 2, batch_size=None))
    paths = sorted(tmp_path.glob("*.ckpt"))
    assert [p.name for p in paths] == ["final.ckpt", "step1.ckpt", "step2.ckpt"]
    for path in paths:
        assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
        assert load_checkpoint(path)["optimizer_states"]


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
