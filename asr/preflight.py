"""Fail in seconds, with instructions, when the data or the pretrained model of a run is missing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from huggingface_hub import try_to_load_from_cache
from omegaconf import DictConfig

from asr.data.librispeech import locate, parts, split_dir

OFFLINE_HINT = "To try the whole pipeline offline on CPU, run: python -m asr.train experiment=demo"


def missing_data(data: DictConfig) -> str | None:
    if data.get("hf_dataset"):
        return _missing_hf_dataset(data.hf_dataset)
    if data.get("demo_corpus") is not None or data.get("archive_url"):
        return None  # synthesised on first use, or streamed from a URL
    splits = dict.fromkeys([*data.train_splits, *data.val_splits, *data.test_splits])
    absent = []
    for part in dict.fromkeys(p for split in splits for p in parts(split)):
        try:
            locate(data.root, part)
        except FileNotFoundError:
            absent.append(part)
    if not absent:
        return None
    return (
        f"LibriSpeech is missing at data.root={data.root}: no {', '.join(absent)} as folders in "
        f"{split_dir(data.root, '').resolve()} or as <split>.tar.gz archives in "
        f"{Path(data.root).expanduser().resolve()}. Download it with `python -m asr.data download data.root=DIR` "
        "(or put the OpenSLR archives from https://www.openslr.org/12 in DIR, or stream them with "
        "data.archive_url=https://www.openslr.org/resources/12), then pass data.root=DIR; or read the Hugging Face "
        'copy with data.hf_dataset=openslr/librispeech_asr (pip install -e ".[hf]").'
    )


def _missing_hf_dataset(dataset: str) -> str | None:
    """A hub id is left to ``datasets`` (from its cache, or downloaded); a folder must exist."""
    if importlib.util.find_spec("datasets") is None:
        return f'data.hf_dataset={dataset} needs the datasets library: pip install -e ".[hf]".'
    if _is_path(dataset) and not Path(dataset).expanduser().is_dir():
        return f"data.hf_dataset={dataset} is not a folder (a local copy of openslr/librispeech_asr, or its hub id)."
    return None


def _is_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).expanduser().exists()


def missing_model(pretrained: str | None) -> str | None:
    if not pretrained:
        return None
    if _is_path(pretrained):
        if (Path(pretrained).expanduser() / "config.json").is_file():
            return None
        return f"model.pretrained={pretrained} is not a folder saved with save_pretrained (no config.json)."
    if isinstance(try_to_load_from_cache(pretrained, "config.json"), str):
        return None
    return (
        f"The pretrained model {pretrained!r} is not in the Hugging Face cache. With network access it is "
        f"downloaded on first use (or fetch it with `hf download {pretrained}`); offline, pass "
        "model.pretrained=/path/to/a/folder/saved/with/save_pretrained."
    )


def check_inputs(cfg: DictConfig) -> None:
    """Exit with a message when the run cannot start.

    A hub id that is not cached yet only stops the run when something else is missing too: with data present,
    transformers downloads it.
    """
    data_problem = missing_data(cfg.data)
    pretrained = cfg.model.get("pretrained")
    model_problem = missing_model(pretrained)
    if data_problem or (model_problem and _is_path(str(pretrained))):
        problems = [p for p in (data_problem, model_problem) if p]
        raise SystemExit("Cannot start training:\n- " + "\n- ".join(problems) + "\n" + OFFLINE_HINT)
