"""The config tree (``conf/``) and composing it outside ``@hydra.main``: the data commands, benchmarks and tests."""

from __future__ import annotations

from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig

import asr

# The package is installed in development mode (pip install -e .): the config tree sits next to it.
CONFIG_DIR = Path(asr.__file__).resolve().parent.parent / "conf"


def compose(config_name: str = "train", overrides: list[str] | None = None, hydra_config: bool = False) -> DictConfig:
    """The config ``config_name`` with command-line style ``overrides``, as ``python -m asr.train`` would see it."""
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name, overrides=list(overrides or []), return_hydra_config=hydra_config)
