"""Loading a trained model: a Lightning checkpoint of ``asr.train`` (architecture included, so without the hub), or
the folder ``python -m asr.export`` writes from one (:func:`save_export`), which transformers loads on its own."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCTC,
    PreTrainedModel,
    Wav2Vec2CTCTokenizer,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2Processor,
)

from asr.backbones import architecture_overrides
from asr.builders import build_tokenizer
from asr.data.text import BOS, EOS, PAD, UNK, WORD_DELIMITER, CharTokenizer
from asr.decoding import Decoder
from asr.model import SpeechRecognizer

log = logging.getLogger(__name__)

# Settings of how to run, not of what was trained: the caller's, not the checkpoint's.
RUNTIME_KEYS = ("attn_implementation", "packed", "compile", "compile_options", "device_specaugment", "onednn_conv")
# How a model runs for inference and export: transformers' own attention, nothing patched in.
INFERENCE_RUNTIME = {"packed": False, "compile": None, "attn_implementation": None, "device_specaugment": False}
# State-dict keys of SpeechRecognizer.packed_encoder, the backbone's encoder registered a second time.
_PACKED_ALIAS = "packed_encoder."


def load_checkpoint(path: str | Path) -> dict:
    """The checkpoint at ``path``, on the CPU, or a SystemExit that says what is wrong with the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SystemExit(f"ckpt_path={path}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same message
        raise SystemExit(f"ckpt_path={path}: not a readable checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "backbone_config" not in checkpoint:
        raise SystemExit(f"ckpt_path={path}: not a checkpoint written by asr.train (no state_dict or backbone_config)")
    return checkpoint


def load_recognizer(
    path: str | Path, tokenizer: CharTokenizer, decoder: Decoder | None = None, runtime: dict | None = None, **overrides
) -> SpeechRecognizer:
    """The model of a checkpoint for evaluation: its architecture and weights, with the ``runtime`` settings
    (:data:`RUNTIME_KEYS`) of the caller and any ``overrides`` of its other arguments (``test_splits``, ...)."""
    checkpoint = load_checkpoint(path)
    model = _recognizer(checkpoint, tokenizer, decoder, runtime, **overrides)
    log.info("Loaded %s (global step %s)", path, checkpoint.get("global_step"))
    return model


def _recognizer(
    checkpoint: dict, tokenizer: CharTokenizer, decoder: Decoder | None = None, runtime: dict | None = None, **overrides
) -> SpeechRecognizer:
    hparams = dict(checkpoint.get("hyper_parameters", {}))
    hparams.update(pretrained=None, config=architecture_overrides(checkpoint["backbone_config"]))
    runtime = {k: v for k, v in (runtime or {}).items() if k in RUNTIME_KEYS}
    model = SpeechRecognizer(
        **{**hparams, **runtime, "tokenizer": tokenizer, "decoder": decoder, "optimizer": None, **overrides}
    )
    # Without the aliases, a checkpoint loads into a model packed or not, whichever way it was trained.
    state = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(_PACKED_ALIAS)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(_PACKED_ALIAS)]
    if missing or unexpected:
        raise RuntimeError(f"the checkpoint does not fit its model: missing {missing}, unexpected {unexpected}")
    return model


@dataclass(frozen=True)
class TrainedModel:
    """What inference needs of a trained model: the transformers CTC model (on the CPU, in eval mode), the tokenizer
    of its CTC head, the sample rate it takes, and the global step of a checkpoint."""

    backbone: PreTrainedModel
    tokenizer: CharTokenizer
    sample_rate: int
    step: int | None = None


def load_trained(path: str | Path) -> TrainedModel:
    """The model of a Lightning checkpoint of ``asr.train`` (a file) or of a folder written by ``asr.export`` (any
    transformers CTC folder with a Wav2Vec2 processor that normalises its input, and a character vocabulary)."""
    path = Path(path).expanduser()
    if path.is_dir():
        return _load_folder(path)
    checkpoint = load_checkpoint(path)
    model = _recognizer(checkpoint, build_tokenizer(), runtime=INFERENCE_RUNTIME)
    step = checkpoint.get("global_step")
    log.info("Loaded %s (global step %s)", path, step)
    return TrainedModel(model.backbone.eval(), model.tokenizer, model.hparams.sample_rate, step)


def _load_folder(path: Path) -> TrainedModel:
    if not (path / "config.json").is_file() or not (path / "vocab.json").is_file():
        raise SystemExit(f"{path}: not a model folder of asr.export (no config.json or vocab.json)")
    try:
        features = Wav2Vec2FeatureExtractor.from_pretrained(path)
        ids = json.loads((path / "vocab.json").read_text())
        tokenizer = CharTokenizer(tuple(sorted(ids, key=ids.get)))
        backbone = AutoModelForCTC.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:
        raise SystemExit(f"{path}: not a readable model folder ({type(err).__name__}: {err})") from err
    if not features.do_normalize:
        raise SystemExit(f"{path}: its feature extractor does not normalise (do_normalize=false); asr's models do")
    if backbone.config.vocab_size != len(tokenizer) or backbone.config.pad_token_id != tokenizer.pad_id:
        raise SystemExit(f"{path}: vocab.json does not match the model's CTC head (vocab_size, pad_token_id)")
    return TrainedModel(backbone.eval(), tokenizer, features.sampling_rate)


def save_export(model: TrainedModel, out: str | Path) -> Path:
    """Write ``model`` as a folder that transformers loads with no code of ours: the weights (safetensors) and config
    of the CTC model, and a Wav2Vec2Processor: a Wav2Vec2CTCTokenizer of its vocabulary (blank = pad) and a
    Wav2Vec2FeatureExtractor that normalises as training does."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.backbone.save_pretrained(out)
    vocab = model.tokenizer.save(out)
    tokenizer = Wav2Vec2CTCTokenizer(
        str(vocab), unk_token=UNK, pad_token=PAD, bos_token=BOS, eos_token=EOS, word_delimiter_token=WORD_DELIMITER
    )
    features = Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=model.sample_rate,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=True,
    )
    Wav2Vec2Processor(feature_extractor=features, tokenizer=tokenizer).save_pretrained(out)
    return out
