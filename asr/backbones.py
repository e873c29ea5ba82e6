"""Backbones: transformers CTC models (HuBERT, wav2vec 2.0, WavLM, ...) from a hub id, a saved folder or a config
alone; their architecture, and the facts about their input that the data needs."""

from __future__ import annotations

from collections.abc import Mapping

from omegaconf import DictConfig, OmegaConf, open_dict
from transformers import AutoConfig, AutoModelForCTC, PretrainedConfig, PreTrainedModel

from asr.data.text import CharTokenizer

_LARGE = {
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "conv_dim": [512] * 7,
    "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
    "conv_stride": [5, 2, 2, 2, 2, 2, 2],
    "feat_extract_norm": "layer",
    "do_stable_layer_norm": True,
    "num_conv_pos_embeddings": 128,
    "num_conv_pos_embedding_groups": 16,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}
# The architectures of the pretrained encoders that conf/model names: their facts and random-init runs need no hub.
ARCHITECTURES = {
    "facebook/hubert-large-ll60k": {"model_type": "hubert", **_LARGE, "conv_bias": True, "feat_proj_layer_norm": True},
    "facebook/wav2vec2-large-lv60": {"model_type": "wav2vec2", **_LARGE, "conv_bias": True},
    "microsoft/wavlm-large": {
        "model_type": "wavlm",
        **_LARGE,
        "conv_bias": False,
        "num_buckets": 320,
        "max_bucket_distance": 800,
    },
}
# Keys of a saved config that are not architecture: the CTC head's size comes from the tokenizer.
_NOT_ARCHITECTURE = (
    "vocab_size",
    "pad_token_id",
    "architectures",
    "transformers_version",
    "_name_or_path",
    "torch_dtype",
    "dtype",
    "id2label",
    "label2id",
)


def architecture_overrides(config: Mapping) -> dict:
    """A saved backbone config (``to_diff_dict``) as ``model.config``, to rebuild the same architecture."""
    return {k: v for k, v in config.items() if k not in _NOT_ARCHITECTURE}


def build_backbone(
    pretrained: str | None, config: Mapping, tokenizer: CharTokenizer, attn_implementation: str | None = None
) -> PreTrainedModel:
    """Load ``pretrained`` (hub id or local folder) with ``config`` as overrides, or random-init from ``config``.

    The CTC head is sized from the tokenizer, and its blank is the tokenizer's pad id. ``attn_implementation``
    (``sdpa``, ``eager``, ...) is transformers' choice when null.
    """
    config = dict(config)
    model_type = config.pop("model_type", None)
    ctc = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_id}
    attention = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if pretrained:
        return AutoModelForCTC.from_pretrained(pretrained, **config, **ctc, **attention)
    if model_type is None:
        raise ValueError("model.config.model_type is required when model.pretrained is null")
    return AutoModelForCTC.from_config(AutoConfig.for_model(model_type, **config, **ctc), **attention)


def known_architecture(pretrained: str) -> dict:
    """The architecture of ``pretrained``: its config in a local folder or the Hugging Face cache, else
    :data:`ARCHITECTURES`; no download."""
    try:
        return AutoConfig.from_pretrained(pretrained, local_files_only=True).to_diff_dict()
    except OSError:
        if pretrained in ARCHITECTURES:
            return dict(ARCHITECTURES[pretrained])
        raise SystemExit(
            f"{pretrained!r}: no config in a local folder or the Hugging Face cache, and no entry in "
            "asr.backbones.ARCHITECTURES"
        ) from None


def random_init(model_cfg: DictConfig) -> str | None:
    """Make ``model`` a random init of ``model.pretrained``'s architecture (for speed runs without the hub); return
    the id it replaced."""
    pretrained = model_cfg.get("pretrained")
    if not pretrained:
        return None
    architecture = architecture_overrides(known_architecture(pretrained))
    with open_dict(model_cfg):
        model_cfg.pretrained = None
        model_cfg.config = {**architecture, **OmegaConf.to_container(model_cfg.config or {}, resolve=True)}
    return pretrained


def input_facts(config: PretrainedConfig, sample_rate: int) -> dict:
    """What the data needs to know of the encoder: the sample rate, the receptive field of its convolutional
    feature encoder (the shortest input that gives a frame) and its frame rate, from its own kernels and strides."""
    if getattr(config, "add_adapter", False):
        raise ValueError("encoders with an adapter after the feature encoder (add_adapter) are not supported")
    receptive_field, hop = 1, 1
    for kernel, stride in zip(config.conv_kernel, config.conv_stride, strict=True):
        receptive_field += (kernel - 1) * hop
        hop *= stride
    return {"sample_rate": sample_rate, "min_samples": receptive_field, "frames_per_second": sample_rate / hop}


def encoder_facts(model_cfg: DictConfig) -> dict:
    """:func:`input_facts` of the configured model, without building it or downloading anything."""
    config = OmegaConf.to_container(model_cfg.get("config") or {}, resolve=True)
    pretrained = model_cfg.get("pretrained")
    if pretrained:
        config = {**known_architecture(pretrained), **config}
    config = dict(config)
    model_type = config.pop("model_type", None)
    if model_type is None:
        raise ValueError("model.config.model_type is required when model.pretrained is null")
    return input_facts(AutoConfig.for_model(model_type, **config), model_cfg.sample_rate)
