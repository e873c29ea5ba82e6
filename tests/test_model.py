import functools

import pytest
import torch

from asr.model import SpeechRecognizer
from tests.helpers import TINY_HUBERT, batch_of, quiet_trainer


def make_module(tokenizer, **kwargs) -> SpeechRecognizer:
    return SpeechRecognizer(tokenizer=tokenizer, optimizer=functools.partial(torch.optim.AdamW, lr=1e-3), **kwargs)


def test_loads_a_pretrained_folder_and_sizes_the_head_from_the_tokenizer(tokenizer, tiny_pretrained):
    module = make_module(tokenizer, pretrained=str(tiny_pretrained), config={"layerdrop": 0.0})
    backbone = module.backbone
    assert type(backbone).__name__ == "HubertForCTC"
    assert backbone.config.vocab_size == len(tokenizer)
    assert backbone.config.pad_token_id == tokenizer.pad_id
    assert backbone.config.layerdrop == 0.0
    assert not any(p.requires_grad for p in backbone.hubert.feature_extractor.parameters())


@pytest.mark.parametrize("model_type", ["hubert", "wav2vec2", "wavlm"])
def test_any_ctc_backbone_builds_the_same_way(tokenizer, model_type):
    module = make_module(tokenizer, config={**TINY_HUBERT, "model_type": model_type}, freeze_feature_encoder=False)
    batch = batch_of([torch.rand(8000) * 2 - 1], [tokenizer.encode("HI")])
    logits, lengths = module(batch["input_values"], batch["attention_mask"])
    assert logits.shape == (1, int(lengths[0]), len(tokenizer))
    assert torch.isfinite(module.ctc_loss(logits, lengths, batch))


def test_padding_invariance(tokenizer):
    """A padded batch gives each utterance the same log-probs as running it alone."""
    torch.manual_seed(0)
    config = {**TINY_HUBERT, "feat_extract_norm": "layer", "do_stable_layer_norm": True}
    module = make_module(tokenizer, config=config).eval()
    audios = [torch.rand(n) * 2 - 1 for n in (16000, 9000, 4321)]
    batch = batch_of(audios, [[5]] * 3)
    with torch.no_grad():
        logits, lengths = module(batch["input_values"], batch["attention_mask"])
        for k, audio in enumerate(audios):
            alone = batch_of([audio], [[5]])
            single, single_len = module(alone["input_values"], alone["attention_mask"])
            assert lengths[k] == single_len[0]
            torch.testing.assert_close(
                logits[k, : lengths[k]].log_softmax(-1), single[0].log_softmax(-1), atol=1e-4, rtol=1e-4
            )


def test_random_init_needs_a_model_type(tokenizer):
    with pytest.raises(ValueError, match="model_type"):
        make_module(tokenizer, config={"hidden_size": 32})


# ------------------------------------------------------------------------------------------- speed switches

FAST = {
    **TINY_HUBERT,
    "feat_extract_norm": "layer",
    "do_stable_layer_norm": True,
    "attention_dropout": 0.0,
    "layerdrop": 0.0,
}


def padded(lengths, seed=0):
    """A zero-padded batch of random audio of these lengths (samples), as the data loaders make it."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    audio = torch.randn(len(lengths), int(lengths.max()), generator=generator)
    mask = torch.arange(audio.shape[1])[None, :] < lengths[:, None]
    return audio * mask, mask


def test_time_mask_has_the_span_semantics_of_transformers():
    from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices

    from asr.speedups import time_mask

    torch.manual_seed(0)
    lengths = torch.tensor([400, 250, 90, 5])
    frames, prob, span, min_masks, draws = 400, 0.05, 10, 2, 400
    masks = torch.stack([time_mask(lengths, frames, prob, span, min_masks) for _ in range(draws)])
    assert masks.shape == (draws, 4, frames) and masks.dtype == torch.bool
    # Never on padding; nothing on an utterance shorter than a span.
    valid = torch.arange(frames)[None, :] < lengths[:, None]
    assert not (masks & ~valid).any()
    assert not masks[:, 3].any()
    # Whole spans only: every masked run is at least `span` frames long.
    for row in masks[:50, :3].reshape(-1, frames):
        edges = torch.diff(torch.cat([torch.tensor([0]), row.int(), torch.tensor([0])]))
        runs = (edges == -1).nonzero()[:, 0] - (edges == 1).nonzero()[:, 0]
        assert (runs >= span).all()
    # min_masks distinct spans even where prob * length / span < 1.
    assert (masks[:, 2].sum(-1) > span).all()
    # The masked fraction per utterance is transformers' own (which it draws with numpy on the host).
    ours = masks.float().sum(-1).mean(0) / lengths
    attention = valid.long().numpy()
    draw = functools.partial(
        _compute_mask_indices, (4, frames), prob, span, attention_mask=torch.from_numpy(attention), min_masks=min_masks
    )
    theirs = sum(draw() for _ in range(draws)).sum(-1) / draws / lengths.numpy()
    torch.testing.assert_close(ours[:3], torch.from_numpy(theirs[:3]).float(), atol=0.012, rtol=0)
    assert 0.035 < ours[0] < 0.055  # about mask_time_prob, less the overlaps


def test_device_specaugment_masks_valid_frames_with_the_learned_embedding(tokenizer):
    config = {**FAST, "mask_time_prob": 0.5, "mask_time_length": 2}
    module = make_module(tokenizer, config=config).train()
    base = module.backbone.base_model
    hidden = torch.randn(2, 30, TINY_HUBERT["hidden_size"])
    frame_mask = torch.arange(30)[None, :] < torch.tensor([[30], [12]])
    out = base._mask_hidden_states(hidden.clone(), attention_mask=frame_mask)
    changed = (out != hidden).any(-1)
    assert changed[:, :12].any() and not changed[1, 12:].any()
    torch.testing.assert_close(out[changed], base.masked_spec_embed.expand(int(changed.sum()), -1))
    # Training steps get masks from the module (with the frames of each utterance), evaluation none.
    audio, mask = padded([16000, 6000])
    logits, lengths = module(audio, mask)
    logits.sum().backward()
    assert base.masked_spec_embed.grad is not None and base.masked_spec_embed.grad.abs().sum() > 0
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(module(audio, mask)[0], module(audio, mask)[0])


@pytest.mark.parametrize(
    ("model_type", "stable"), [("hubert", True), ("hubert", False), ("wav2vec2", True), ("wav2vec2", False)]
)
def test_packed_encoder_gives_the_padded_results(tokenizer, model_type, stable):
    """The layers on the valid frames only, packed: the same logits, and the same gradients, as padded."""
    torch.manual_seed(0)
    config = {
        **FAST,
        "model_type": model_type,
        "do_stable_layer_norm": stable,
        "feat_extract_norm": "layer" if stable else "group",
    }
    module = make_module(tokenizer, config=config, packed=True, freeze_feature_encoder=False).eval()
    assert module.backbone.config._attn_implementation == "asr_packed"
    audio, mask = padded([16000, 9000, 4321])
    packed_logits, lengths = module(audio, mask)
    padded_logits = module.backbone(audio, attention_mask=mask).logits  # no packing set: transformers' path
    for k, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(packed_logits[k, :n], padded_logits[k, :n], atol=1e-4, rtol=1e-4)
    weight = module.backbone.base_model.encoder.layers[0].attention.q_proj.weight
    grads = []
    for logits in (packed_logits, padded_logits):
        module.zero_grad()
        sum(logits[k, :n].log_softmax(-1)[:, 5].sum() for k, n in enumerate(lengths.tolist())).backward(
            retain_graph=True
        )
        grads.append(weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-4, rtol=1e-3)


def test_packed_rejects_attention_dropout_and_unsupported_models(tokenizer):
    with pytest.raises(ValueError, match="attention_dropout"):
        make_module(tokenizer, config={**FAST, "attention_dropout": 0.1}, packed=True)
    with pytest.raises(ValueError, match="wavlm"):
        make_module(tokenizer, config={**FAST, "model_type": "wavlm"}, packed=True)


def test_packed_training_forward_reads_nothing_back_from_the_device(tokenizer):
    """On the meta device a tensor has no values: a forward+backward that runs there never waits for the GPU.

    The packing is computed from the loader batch's lengths on the host, before the batch moves
    (on_before_batch_transfer).
    transformers' padded path does read values back (its attention-mask check and its numpy SpecAugment).
    """
    config = {**FAST, "mask_time_prob": 0.3, "mask_time_length": 2}
    audio, mask = padded([16000, 9000])
    for packed, works in ((True, True), (False, False)):
        module = make_module(tokenizer, config=config, packed=packed, freeze_feature_encoder=False).train()
        batch = module.on_before_batch_transfer({"input_values": audio, "lengths": mask.sum(-1).tolist()}, 0)
        packing = batch.get("packing")
        module.to("meta")
        meta_packing = packing.to("meta") if packing is not None else None

        def step(module=module, meta_packing=meta_packing):
            logits, _ = module(audio.to("meta"), mask.to("meta"), meta_packing)
            logits.float().log_softmax(-1).sum().backward()
            return logits

        if works:
            assert step().shape[:2] == (2, 799)
            assert module.backbone.base_model.masked_spec_embed.grad is not None
        else:
            with pytest.raises((RuntimeError, NotImplementedError)):
                step()


def test_regional_compile_keeps_parameter_names_and_results(tokenizer):
    torch.manual_seed(0)
    eager = make_module(tokenizer, config=FAST).eval()
    compiled = make_module(
        tokenizer, config=FAST, compile="layers", compile_options={"backend": "aot_eager", "dynamic": True}
    ).eval()
    compiled.load_state_dict(eager.state_dict())
    compiled.configure_model()
    assert compiled.compiled == ["layers (2 modules)"]
    assert all(layer._compiled_call_impl is not None for layer in compiled.backbone.base_model.encoder.layers)
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    for lengths in ([16000, 9000], [7000, 6500, 3000]):
        audio, mask = padded(lengths)
        with torch.no_grad():
            torch.testing.assert_close(compiled(audio, mask)[0], eager(audio, mask)[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="model.compile"):
        make_module(tokenizer, config=FAST, compile="everything").configure_model()


def test_sync_free_logging_logs_the_mean_loss_with_a_fused_clipped_optimizer(tokenizer, tmp_path):
    """bf16-mixed + fused AdamW + gradient clipping (which Lightning alone refuses), logging every 2 steps."""
    import csv

    import lightning as L

    torch.manual_seed(0)
    module = SpeechRecognizer(
        tokenizer=tokenizer,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3, fused=True),
        config=FAST,
    )
    batches = []
    for seed in range(4):
        audio, mask = padded([8000, 6000], seed=seed)
        batches.append(
            {
                "input_values": audio,
                "attention_mask": mask,
                "labels": torch.tensor([[5, 6], [7, -100]]),
                "label_lengths": torch.tensor([2, 1]),
                "ids": ["a", "b"],
                "texts": ["ET", "A"],
            }
        )
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    logger = L.pytorch.loggers.CSVLogger(tmp_path)
    trainer = L.Trainer(
        accelerator="cpu",
        precision="bf16-mixed",
        gradient_clip_val=1e-3,
        max_steps=4,
        log_every_n_steps=2,
        logger=logger,
        callbacks=[Record()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    before = module.backbone.lm_head.weight.detach().clone()
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    # Clipping to a norm of 1e-3 keeps the first Adam steps (size ~lr each) but they did happen.
    assert not torch.equal(before, module.backbone.lm_head.weight)
    rows = [r for r in csv.DictReader(open(logger.log_dir + "/metrics.csv")) if r.get("train/loss")]
    # Written at steps 1 and 3, each the mean loss of the steps since the previous write.
    assert [int(r["step"]) for r in rows] == [1, 3]
    expected = [(losses[0] + losses[1]) / 2, (losses[2] + losses[3]) / 2]
    assert [float(r["train/loss"]) for r in rows] == pytest.approx(expected, rel=1e-5)
    assert trainer.progress_bar_metrics["train/loss"] == pytest.approx(expected[-1], rel=1e-5)


def test_native_cpu_convolutions_give_the_same_results_and_cover_the_backward(tokenizer):
    torch.manual_seed(0)
    config = {**FAST, "conv_dim": [16, 16], "conv_kernel": [10, 4], "conv_stride": [5, 4]}
    onednn = make_module(tokenizer, config=config, freeze_feature_encoder=False)
    native = make_module(tokenizer, config=config, freeze_feature_encoder=False, onednn_conv=False)
    native.load_state_dict(onednn.state_dict())
    audio, mask = padded([16000, 9000])
    batch = {
        "input_values": audio,
        "attention_mask": mask,
        "labels": torch.tensor([[5, 6], [7, -100]]),
        "label_lengths": torch.tensor([2, 1]),
        "ids": ["a", "b"],
        "texts": ["ET", "A"],
    }
    grads = []
    for module in (onednn, native):
        logits, lengths = module.eval()(audio, mask)  # eval: no dropout or SpecAugment draws
        module.ctc_loss(logits, lengths, batch).backward()
        grads.append(module.backbone.base_model.feature_extractor.conv_layers[0].conv.weight.grad)
    # Summed over thousands of positions in another order: equal to float32 rounding, relative to the largest.
    torch.testing.assert_close(grads[1], grads[0], atol=1e-4 * float(grads[0].abs().max()), rtol=1e-3)

    flag_in_backward = []
    native.train()
    conv = native.backbone.base_model.feature_extractor.conv_layers[0].conv
    conv.weight.register_hook(lambda grad: flag_in_backward.append(torch.backends.mkldnn.enabled))
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(native, train_dataloaders=torch.utils.data.DataLoader([batch], batch_size=None))
    assert flag_in_backward == [False]
    assert torch.backends.mkldnn.enabled  # restored after the step


@pytest.mark.parametrize("freeze_encoder_steps", [0, 1])
def test_only_the_ctc_head_learns_while_the_encoder_is_frozen(tokenizer, freeze_encoder_steps):
    module = make_module(
        tokenizer, config=FAST, freeze_feature_encoder=False, freeze_encoder_steps=freeze_encoder_steps
    ).train()
    batch = batch_of([torch.rand(8000) * 2 - 1], [tokenizer.encode("HI")])
    logits, lengths = module(batch["input_values"], batch["attention_mask"])
    module.ctc_loss(logits, lengths, batch).backward()
    learning = {name.split(".")[1] for name, p in module.named_parameters() if p.grad is not None}
    assert learning == ({"lm_head"} if freeze_encoder_steps else {"lm_head", "hubert"})


# ------------------------------------------------------------------------------------------- out of memory


def out_of_memory(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nmore details")


def one_batch(tokenizer) -> list[dict]:
    batch = batch_of([torch.rand(8000) * 2 - 1, torch.rand(4000) * 2 - 1], [tokenizer.encode("HI")] * 2)
    return [{**batch, "ids": ["a", "b"], "texts": ["HI", "HI"]}]


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_out_of_memory_in_training_names_the_batch_and_the_settings(tokenizer, monkeypatch, where):
    module = make_module(tokenizer, config=FAST, freeze_feature_encoder=False)
    if where == "forward":
        monkeypatch.setattr(module.backbone, "forward", out_of_memory)
    else:
        module.backbone.lm_head.weight.register_hook(out_of_memory)
    with pytest.raises(torch.OutOfMemoryError) as error:
        quiet_trainer(max_steps=1).fit(
            module, train_dataloaders=torch.utils.data.DataLoader(one_batch(tokenizer), None)
        )
    assert str(error.value) == (
        "Out of memory in a training batch of 2 utterances, 1.0 s of audio with padding (the longest 0.5 s), on rank "
        "0. Make batches smaller: data.max_batch_seconds when batching by seconds of audio, data.batch_size when by "
        "utterances. (CUDA out of memory. Tried to allocate 2.00 GiB.)"
    )
    assert isinstance(error.value.__cause__, torch.OutOfMemoryError)


def test_out_of_memory_in_evaluation_names_the_batch_and_the_eval_settings(tokenizer, monkeypatch):
    module = make_module(tokenizer, config=FAST, test_splits=("test-clean",))
    monkeypatch.setattr(module.backbone, "forward", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError, match="in a test batch of 2 utterances, 1.0 s of audio") as error:
        quiet_trainer(max_steps=1).test(module, dataloaders=torch.utils.data.DataLoader(one_batch(tokenizer), None))
    assert "data.eval_max_batch_seconds when batching by seconds of audio, data.eval_batch_size" in str(error.value)
