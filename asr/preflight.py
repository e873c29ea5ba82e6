"""Fail in seconds, with instructions, when the data or the pretrained model of a run is missing."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import try_to_load_from_cache
from hydra.utils import instantiate
from omegaconf import DictConfig

OFFLINE_HINT = "To try the whole pipeline offline on CPU, run: python -m asr.train experiment=demo"


def missing_data(data: DictConfig) -> str | None:
    """Why the configured source cannot give the run's splits, or None."""
    splits = list(dict.fromkeys([*data.train_splits, *data.val_splits, *data.test_splits]))
    return instantiate(data.source).missing(splits)


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
