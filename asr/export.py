"""A trained model as a Hugging Face model folder: ``python -m asr.export ckpt_path=PATH out=DIR``.

``out`` gets what ``transformers.pipeline("automatic-speech-recognition", model=out)`` loads with no code of ours:
the CTC model's weights (safetensors) and config, a Wav2Vec2Processor (tokenizer of our vocabulary, feature extractor
with our sample rate and normalisation), and a README.md model card in the format of the Trainer's, filled from the
run folder the checkpoint is in (its config, CSV logs and metrics.json). Its greedy transcripts are those of
``python -m asr.transcribe out`` and of the checkpoint itself.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from asr.checkpoint import load_trained, save_export
from asr.modelcard import model_card

log = logging.getLogger(__name__)


def export(cfg: DictConfig) -> Path:
    ckpt_path, out = Path(cfg.ckpt_path).expanduser(), Path(cfg.out).expanduser()
    if ckpt_path.is_dir():
        raise SystemExit(f"ckpt_path={ckpt_path}: a folder; asr.export takes a Lightning checkpoint of asr.train")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise SystemExit(f"out={out}: a folder that is neither empty nor an earlier export")
    model = load_trained(ckpt_path)
    save_export(model, out)
    (out / "README.md").write_text(model_card(ckpt_path, model, cfg.name or out.resolve().name))
    print(out)
    return out


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    export(cfg)


if __name__ == "__main__":
    main()
