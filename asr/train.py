"""Train, then test: ``python -m asr.train [experiment=...] [key=value ...]``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from asr import wandb_run
from asr.builders import build_datamodule, build_logger, build_model, build_tokenizer, build_trainer
from asr.callbacks import FinalCheckpoint
from asr.checkpoint import resume_path
from asr.data.librispeech import DataError
from asr.preflight import check_inputs

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit on the train splits, test the final weights on the test splits, and return (and save) the metrics.

    ``metrics.json`` names the checkpoint of the tested weights (``checkpoints/final.ckpt``, :class:`FinalCheckpoint`):
    ``python -m asr.evaluate ckpt_path=...`` on it gives the same test metrics.
    """
    check_inputs(cfg)
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    # ckpt_path=last becomes the run's newest checkpoint (or None); W&B reads the run id from the path.
    cfg.ckpt_path = resume_path(cfg.get("ckpt_path"), output_dir / "checkpoints")
    wandb_run.check_credentials(cfg)  # logger=wandb online without credentials: stop now, not at a login prompt
    L.seed_everything(cfg.seed, workers=True)
    tokenizer = build_tokenizer()
    model = build_model(cfg, tokenizer)
    datamodule = build_datamodule(cfg, tokenizer, model.input_facts)
    # W&B: the run's config, group and name, and the run id of the checkpoint resumed from (asr/wandb_run.py).
    trainer = build_trainer(cfg, logger=build_logger(cfg, **wandb_run.logger_overrides(cfg)))

    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
        fit_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        trainer.test(model, datamodule=datamodule)
    except BaseException:
        wandb_run.finish(trainer, exit_code=1)
        raise
    wandb_run.finish(trainer)  # the next point of a sweep in this process starts its own W&B run
    metrics = {**fit_metrics, **{k: float(v) for k, v in trainer.callback_metrics.items()}}
    metrics["data/skipped"] = float(sum(datamodule.skipped.values()))
    final = next((c.path for c in trainer.callbacks if isinstance(c, FinalCheckpoint)), None)

    path = output_dir / "metrics.json"
    report = json.dumps({**metrics, "checkpoint": None if final is None else str(final)}, indent=1, sort_keys=True)
    if trainer.is_global_zero:
        path.write_text(report)
    log.info("Final metrics (%s):\n%s", path, report)
    print(json.dumps({k: round(v, 4) for k, v in sorted(metrics.items()) if k.startswith("test/")}, indent=1))
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    except (SystemExit, DataError) as stop:
        # A run that cannot start (asr.preflight, W&B credentials) or a bad file under data.on_error=raise ends with
        # its message, no traceback; a sweep point fails alone (a SystemExit would end the sweep).
        message = str(stop) if isinstance(stop, DataError) else stop.code
        if not isinstance(message, str):
            raise
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise RuntimeError(message) from None
        raise SystemExit(message) from None
    return metrics.get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
