"""Loading a trained model: a Lightning checkpoint of ``asr.train`` (architecture included, so without the hub), or
the folder ``python -m asr.export`` writes from one (:func:`save_export`), which transformers loads on its own."""

from __future__ import annotations

import json
import logging
import pickle
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
from asr.callbacks import FINAL_CHECKPOINT
from asr.data.text import BOS, EOS, PAD, UNK, WORD_DELIMITER, CharTokenizer
from asr.decoding import Decoder
from asr.model import SpeechRecognizer

log = logging.getLogger(__name__)

# Settings of how to run, not of what was trained: the caller's, not the checkpoint's.
RUNTIME_KEYS = ("attn_implementation", "packed", "compile", "compile_options", "device_specaugment", "onednn_conv")
# How a model runs for inference and export: transformers' own attention, nothing patched in.
INFERENCE_RUNTIME = {"packed": False, "compile": None, "attn_implementation": None, "device_specaugment": False}
# What torch.save writes: a zip archive.
ZIP_MAGIC = b"PK\x03\x04"
# ckpt_path=last: the newest checkpoint of the run folder (resume_path).
LAST = "last"
# State-dict keys of SpeechRecognizer.packed_encoder, the backbone's encoder registered a second time.
_PACKED_ALIAS = "packed_encoder."


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """The checkpoint at ``path``, on the CPU (``mmap``: its tensors mapped, not read), or a SystemExit that says what
    is wrong with the file.

    Loaded with ``weights_only=True``: tensors, containers and plain values only, which is all that ``asr.train``
    writes (``tests/test_checkpoint.py`` checks a trained run's checkpoints), so no allow-list is needed. A file that
    holds anything else (a pickled function or class, which loading would run) is refused, naming what it holds.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise SystemExit(f"ckpt_path={path}: no such file")
    with open(path, "rb") as file:
        head = file.read(4)
    if head != ZIP_MAGIC:  # what torch.save has written since PyTorch 1.6, and Lightning always
        raise SystemExit(
            f"ckpt_path={path}: not a readable checkpoint: not a file torch.save writes (it begins {head!r})"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        unsafe = _unsafe_globals(path)
        if not unsafe:
            raise SystemExit(f"ckpt_path={path}: not a readable checkpoint ({_first_line(err)})") from err
        raise SystemExit(
            f"ckpt_path={path}: refused: it holds {', '.join(unsafe)}, code that loading would run. A checkpoint of "
            "asr.train holds only tensors and plain values; this file was written by something else, or altered."
        ) from None
    except Exception as err:  # noqa: BLE001 - a zip archive that does not read: cut short or damaged
        raise SystemExit(
            f"ckpt_path={path}: not a readable checkpoint: cut short or damaged ({_first_line(err)})"
        ) from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "backbone_config" not in checkpoint:
        raise SystemExit(f"ckpt_path={path}: not a checkpoint written by asr.train (no state_dict or backbone_config)")
    return checkpoint


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - the caller reports the load error instead
        return []


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"


def resume_path(ckpt_path: str | None, checkpoints: Path) -> str | None:
    """The checkpoint ``asr.train`` resumes from: ``ckpt_path`` itself, checked; for ``last``, the newest checkpoint
    in ``checkpoints`` (the run folder's) other than ``final.ckpt`` (Ctrl+C writes it mid-step), or None when it
    has none. Without ``ckpt_path``, a folder that holds checkpoints already is an error: they would be overwritten."""
    resumable = sorted(
        (p for p in checkpoints.glob("*.ckpt") if p.name != FINAL_CHECKPOINT),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    if ckpt_path is None:
        if resumable:
            raise SystemExit(
                f"{checkpoints} holds checkpoints already ({', '.join(p.name for p in resumable)}): resume them with "
                "ckpt_path=last, or start a new run in another folder (hydra.run.dir=...)"
            )
        return None
    if ckpt_path == LAST:
        if not resumable:
            log.info("ckpt_path=last: no checkpoint in %s yet, starting from scratch", checkpoints)
            return None
        ckpt_path = str(resumable[0])
        log.info("ckpt_path=last: resuming from %s, the newest checkpoint of this run", ckpt_path)
    checkpoint = load_checkpoint(ckpt_path, mmap=True)  # a bad file stops here, with a message, not in Lightning
    log.info("Resuming from %s (global step %s)", ckpt_path, checkpoint.get("global_step"))
    return ckpt_path


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
