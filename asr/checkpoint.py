"""Loading a trained model: a Lightning checkpoint of ``asr.train`` (architecture included, so without the hub)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from asr.backbones import architecture_overrides
from asr.data.text import CharTokenizer
from asr.decoding import Decoder
from asr.model import SpeechRecognizer

log = logging.getLogger(__name__)

# Settings of how to run, not of what was trained: the caller's, not the checkpoint's.
RUNTIME_KEYS = ("attn_implementation", "packed", "compile", "compile_options", "device_specaugment", "onednn_conv")


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
    hparams = dict(checkpoint.get("hyper_parameters", {}))
    hparams.update(pretrained=None, config=architecture_overrides(checkpoint["backbone_config"]))
    runtime = {k: v for k, v in (runtime or {}).items() if k in RUNTIME_KEYS}
    model = SpeechRecognizer(
        **{**hparams, **runtime, "tokenizer": tokenizer, "decoder": decoder, "optimizer": None, **overrides}
    )
    model.load_state_dict(checkpoint["state_dict"])
    log.info("Loaded %s (global step %s)", path, checkpoint.get("global_step"))
    return model
