import functools

import pytest
import torch

from asr.data.dataset import collate
from asr.model import SpeechRecognizer
from tests.conftest import TINY_HUBERT


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
    batch = collate([
        {"id": "a", "audio": torch.randn(8000), "labels": torch.tensor(tokenizer.encode("HI")), "text": "HI"},
    ])
    logits, lengths = module(batch["input_values"], batch["attention_mask"])
    assert logits.shape == (1, int(lengths[0]), len(tokenizer))
    assert torch.isfinite(module.ctc_loss(logits, lengths, batch))


def test_padding_invariance(tokenizer):
    """A padded batch gives each utterance the same log-probs as running it alone."""
    torch.manual_seed(0)
    config = {**TINY_HUBERT, "feat_extract_norm": "layer", "do_stable_layer_norm": True}
    module = make_module(tokenizer, config=config).eval()
    items = [
        {"id": str(n), "audio": torch.randn(n), "labels": torch.tensor([5]), "text": "E"}
        for n in (16000, 9000, 4321)
    ]
    batch = collate(items)
    with torch.no_grad():
        logits, lengths = module(batch["input_values"], batch["attention_mask"])
        for k, item in enumerate(items):
            alone = collate([item])
            single, single_len = module(alone["input_values"], alone["attention_mask"])
            assert lengths[k] == single_len[0]
            torch.testing.assert_close(
                logits[k, : lengths[k]].log_softmax(-1), single[0].log_softmax(-1), atol=1e-4, rtol=1e-4
            )


def test_random_init_needs_a_model_type(tokenizer):
    with pytest.raises(ValueError, match="model_type"):
        make_module(tokenizer, config={"hidden_size": 32})
