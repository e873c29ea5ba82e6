"""Weights & Biases runs (``logger=wandb``): the run's config, group and name, its id kept with the checkpoints so that
a resumed run continues the same W&B run, and a credentials check that stops a run at once instead of at a prompt.

``asr.train`` calls :func:`check_credentials` before building anything, builds the logger with
:func:`logger_overrides` and ends the run with :func:`finish`; :class:`WandbRunId` (conf/callbacks/default.yaml)
keeps the id. Without a W&B logger each of them does nothing.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_class
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, ListConfig, OmegaConf

log = logging.getLogger(__name__)

RUN_ID_FILE = "wandb_run_id"
OFFLINE_MODES = ("offline", "dryrun", "disabled")


class RunConfig:
    """The run's config on its way to :class:`WandbLogger`, boxed: Hydra's ``instantiate`` passes an object through
    as it is, where it would read a plain dict as config (a value holding ``${`` as an interpolation)."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values


class WandbLogger(LightningWandbLogger):
    """Lightning's WandbLogger, given the run's config when the run is created (``run_config``: :func:`flat_config`
    in a :class:`RunConfig`; it goes to ``wandb.init(config=...)``). That config holds the model's arguments
    (``model.*``), so Lightning's own call with the LightningModule's hyperparameters is then skipped rather than
    adding them again as top-level keys.

    ``group``, ``job_type``, ``tags``, ``entity``, ``resume``, ``mode`` and any other keyword go to ``wandb.init``.
    """

    def __init__(self, *, run_config: RunConfig | dict[str, Any] | None = None, **kwargs: Any) -> None:
        run_config = run_config.values if isinstance(run_config, RunConfig) else _plain(run_config)
        kwargs = {k: _plain(v) for k, v in kwargs.items()}
        if kwargs.get("tags") is not None:
            kwargs["tags"] = [str(t) for t in kwargs["tags"]] or None
        super().__init__(config=run_config, **kwargs)
        self._has_config = run_config is not None
        if getattr(self, "_wandb_init", {}).get("anonymous", False) is None:
            del self._wandb_init["anonymous"]  # wandb warns that the setting is gone, even when it is None

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        if not self._has_config:
            super().log_hyperparams(params)


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def is_wandb(logger_cfg: DictConfig | None) -> bool:
    """Whether a logger config (``cfg.logger``) builds a W&B logger."""
    target = logger_cfg.get("_target_") if isinstance(logger_cfg, DictConfig) else None
    if not target:
        return False
    try:
        return issubclass(get_class(target), LightningWandbLogger)
    except Exception:  # a class that does not import is not ours to judge; instantiate() will say why
        return False


def wandb_loggers(trainer: L.Trainer) -> list[LightningWandbLogger]:
    return [logger for logger in trainer.loggers if isinstance(logger, LightningWandbLogger)]


# --- the run's config, group and name ---------------------------------------------------------------------------


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level, keys joined with dots (``{"optimizer": {"lr": 1}}`` -> ``{"optimizer.lr": 1}``);
    lists stay values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def flat_config(cfg: DictConfig) -> dict[str, Any]:
    """The run's resolved config, flattened with dots (``optimizer.lr``, ``model.config.hidden_size``), so that each
    key is a dashboard column; inside a Hydra job also the chosen config groups (``choices.experiment``,
    ``choices.model``, ...), the command's overrides (``overrides``) and the run folder (``output_dir``)."""
    flat = flatten(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False))
    if HydraConfig.initialized():
        hydra = HydraConfig.get()
        flat.update({f"choices.{group}": option for group, option in hydra.runtime.choices.items()})
        flat["overrides"] = list(hydra.overrides.task)
        flat["output_dir"] = hydra.runtime.output_dir
    return flat


def default_group_and_name() -> tuple[str | None, str | None]:
    """Under ``-m``: the sweep (its folder, e.g. ``multirun/2025-06-01/12-00-00``) and the point's subfolder.
    Otherwise: the experiment (``experiment=demo`` -> ``demo``; none for the root config) and the command's
    overrides as Hydra joins them (none: W&B picks a name)."""
    if not HydraConfig.initialized():
        return None, None
    hydra = HydraConfig.get()
    if hydra.mode == RunMode.MULTIRUN:
        output_dir = Path(hydra.runtime.output_dir)
        try:
            subdir = str(hydra.sweep.subdir)
        except Exception:
            subdir = output_dir.name
        sweep_dir = output_dir
        for _ in Path(subdir).parts:
            sweep_dir = sweep_dir.parent
        try:
            group = os.path.relpath(sweep_dir)
        except ValueError:  # another drive (Windows)
            group = str(sweep_dir)
        return group, str(output_dir.relative_to(sweep_dir))
    return hydra.runtime.choices.get("experiment"), hydra.job.override_dirname or None


def logger_overrides(cfg: DictConfig) -> dict[str, Any]:
    """What ``asr.train`` adds to ``cfg.logger`` when it is W&B: the run's config, the default group and name (where
    the config leaves them null), and, when resuming from a checkpoint of a W&B run, that run's id."""
    logger = cfg.get("logger")
    if not is_wandb(logger):
        return {}
    overrides: dict[str, Any] = {"run_config": RunConfig(flat_config(cfg))}
    group, name = default_group_and_name()
    if logger.get("group") is None and group:
        overrides["group"] = group
    if logger.get("name") is None and name:
        overrides["name"] = name
    run_id = resumed_run_id(cfg.get("ckpt_path"))
    if run_id and not (logger.get("id") or logger.get("version")):
        overrides.update(id=run_id, resume="allow")
        log.info("W&B: resuming run %s (from %s)", run_id, cfg.ckpt_path)
    return overrides


# --- the run id, kept with the checkpoints ---------------------------------------------------------------------


class WandbRunId(L.Callback):
    """Keeps the W&B run's id with the checkpoints: in ``<dirpath>/wandb_run_id`` and in each checkpoint's callback
    state, so that training resumed from one of them (``ckpt_path=``) continues the same W&B run
    (:func:`resumed_run_id`). Does nothing without a W&B logger."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.run_id: str | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loggers = wandb_loggers(trainer)
        if not loggers or not trainer.is_global_zero:
            return
        self.run_id = getattr(loggers[0].experiment, "id", None)
        if self.run_id:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            (self.dirpath / RUN_ID_FILE).write_text(f"{self.run_id}\n")
            log.info("W&B run %s (id in %s)", self.run_id, self.dirpath / RUN_ID_FILE)

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id} if self.run_id else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        resumed = state_dict.get("run_id")
        if resumed and self.run_id and resumed != self.run_id:
            log.warning("Resumed from a checkpoint of W&B run %s, logging to run %s", resumed, self.run_id)


def resumed_run_id(ckpt_path: str | os.PathLike | None) -> str | None:
    """The W&B run id of the run that saved ``ckpt_path``: from the checkpoint's :class:`WandbRunId` state, else from
    the ``wandb_run_id`` file beside it; None when neither has one."""
    if not ckpt_path or not Path(ckpt_path).is_file():
        return None
    path = Path(ckpt_path)
    try:
        # mmap: the tensors are not read, only the pickled structure around them.
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        for key, state in (checkpoint.get("callbacks") or {}).items():
            if str(key).startswith(WandbRunId.__qualname__) and isinstance(state, dict) and state.get("run_id"):
                return str(state["run_id"])
    except Exception as error:  # not a checkpoint torch can map: the file beside it may still say
        log.warning("W&B: could not read the run id from %s (%s)", path, error)
    beside = path.parent / RUN_ID_FILE
    if beside.is_file():
        return beside.read_text().strip() or None
    return None


# --- credentials -------------------------------------------------------------------------------------------------


def missing_credentials() -> str | None:
    """Why ``wandb.init`` would stop at a login prompt (or fail) now, or None: mode online and no API key in the
    environment, in ~/.netrc (or $NETRC) or in wandb's settings. Reads variables and files only; no network."""
    from wandb.sdk import wandb_setup

    settings = wandb_setup.singleton().settings  # WANDB_* variables and settings files; starts no process
    if settings.mode in OFFLINE_MODES:
        return None
    host = settings.base_url  # W&B's cloud unless WANDB_BASE_URL or `wandb login --host` says otherwise
    try:
        if _has_credentials(host):
            return None
    except Exception as error:  # a key wandb finds but cannot use (wrong format, two kinds at once)
        return f"wandb cannot use its credentials: {error}."
    netloc = host.split("://")[-1].split("/")[0]
    return (
        f"logger=wandb is online, but there are no W&B credentials for {netloc} (no WANDB_API_KEY, no entry in "
        f"{os.environ.get('NETRC', '~/.netrc')}), so wandb would stop at a login prompt."
    )


def _has_credentials(host: str) -> bool:
    """Whether wandb finds credentials for ``host`` where ``wandb.init`` looks, without prompting."""
    try:
        from wandb.sdk.lib.wbauth import authenticate_session
    except ImportError:  # a wandb without it: look where it looks
        return bool(os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE")) or _netrc_has(host)
    return authenticate_session(host=host, source="asr.train", prompt=False, update_session=False) is not None


def _netrc_has(host: str) -> bool:
    import netrc

    path = Path(os.environ.get("NETRC", "~/.netrc")).expanduser()
    try:
        return path.is_file() and netrc.netrc(path).authenticators(host.split("://")[-1].split("/")[0]) is not None
    except (netrc.NetrcParseError, OSError):
        return False


def credentials_problem(cfg: DictConfig) -> str | None:
    """The message to stop a run with when its W&B logger has no way to log in, else None."""
    logger = cfg.get("logger")
    if not is_wandb(logger) or logger.get("offline") or logger.get("mode") in OFFLINE_MODES:
        return None
    problem = missing_credentials()
    if problem is None:
        return None
    return (
        f"Cannot start training: {problem}\nEither:\n"
        "- log in once: `wandb login` (it stores the key in ~/.netrc; or set WANDB_API_KEY), or\n"
        "- run offline, and upload later with `wandb sync <run folder>/wandb/offline-run-*`: add logger.offline=true "
        "(or set WANDB_MODE=offline)."
    )


def check_credentials(cfg: DictConfig) -> None:
    """Exit at once, with the two ways out, when ``logger=wandb`` is online without credentials."""
    problem = credentials_problem(cfg)
    if problem:
        raise SystemExit(problem)


def finish(trainer: L.Trainer | None, exit_code: int = 0) -> None:
    """Finish the trainer's W&B run, if it started one: the next run of a sweep in this process gets its own."""
    if trainer is None or not trainer.is_global_zero:
        return
    for logger in wandb_loggers(trainer):
        run = getattr(logger, "_experiment", None)
        if run is not None and hasattr(run, "finish"):
            run.finish(exit_code=exit_code)
