"""Preemption: a signal to stop (SIGTERM from ``kill``, a scheduler's preemption, SLURM's warning before the time
limit) ends training at the next optimizer step with an exact checkpoint, and under SLURM puts the job back in
the queue, so that its next start (``ckpt_path=last``, same run folder) continues where it stopped."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from pathlib import Path
from types import FrameType

import lightning as L
import torch

log = logging.getLogger(__name__)


class Preempted(SystemExit):
    """Training ended on a signal after writing its checkpoint; the exit status is the shell's for that signal."""

    def __init__(self, signum: signal.Signals) -> None:
        super().__init__(128 + signum)
        self.signum = signum


class Preemption(L.Callback):
    """On any of ``signals``, during training: finish the optimizer step under way, write ``<dirpath>/<filename>``
    (the exact state after that step, as a mid-epoch ``ModelCheckpoint``), requeue a SLURM job when the signal is
    one of ``requeue`` (``scontrol requeue $SLURM_JOB_ID``), and exit with status 128 + the signal.

    The handlers replace Lightning's for these signals while training runs (Lightning's save SLURM's checkpoint
    inside the handler, in the middle of a step). A handler only takes note; the step boundary acts. With several
    ranks, any rank's signal stops all of them at the same step (one all-reduce of a scalar per step; Lightning
    already broadcasts its own flag every step), so a ``kill`` of one process is enough.
    """

    def __init__(
        self,
        dirpath: str,
        filename: str = "last.ckpt",
        signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1", "SIGUSR2"),
        requeue: tuple[str, ...] = ("SIGUSR1", "SIGUSR2"),
    ) -> None:
        self.path = Path(dirpath) / filename
        self.signals = [signal.Signals[name] for name in signals]
        self.requeue = {signal.Signals[name] for name in requeue}
        self.received: signal.Signals | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning registers its handlers just before this hook: ours replace them, and Lightning's teardown (on any
        # end of fit) puts back those from before fit.
        if threading.current_thread() is not threading.main_thread():
            log.warning("Training runs outside the main thread: no handler for %s", _names(self.signals))
            return
        self.received = None
        for signum in self.signals:
            signal.signal(signum, self._note)

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)
        log.warning("%s received: training stops after the step under way, with a checkpoint", self.received.name)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.fit_loop._should_accumulate():  # mid-accumulation: the accumulated gradients are not saved
            return
        signum = self.received
        if trainer.world_size > 1:  # SIGTERM (15) outranks SIGUSR1 and SIGUSR2 (10, 12): a cancel never requeues
            code = int(
                trainer.strategy.reduce(torch.tensor(int(signum or 0), device=pl_module.device), reduce_op="max")
            )
            signum = signal.Signals(code) if code else None
        if signum is None:
            return
        trainer.save_checkpoint(self.path, weights_only=False)  # everything, to resume
        if trainer.is_global_zero:
            log.warning(
                "%s: stopped after step %d (epoch %d), checkpoint %s. To resume: the same command with "
                "ckpt_path=last and the same run folder (hydra.run.dir=%s)",
                signum.name,
                trainer.global_step,
                trainer.current_epoch,
                self.path,
                self.path.parent.parent,
            )
        if signum in self.requeue and trainer.is_global_zero:
            requeue_slurm_job()
        raise Preempted(signum)


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` in a job array, else ``$SLURM_JOB_ID``."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def requeue_slurm_job() -> bool:
    """``scontrol requeue`` this SLURM job (nothing outside SLURM); whether it was requeued."""
    job = slurm_job_id()
    if job is None:
        log.info("Not a SLURM job: nothing to requeue")
        return False
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        log.error("SLURM job %s not requeued: scontrol requeue failed (%s)", job, error)
        return False
    if result.returncode != 0:
        log.error("SLURM job %s not requeued: scontrol requeue exited %d: %s", job, result.returncode, result.stderr)
        return False
    log.warning("SLURM job %s requeued: its next start resumes from the checkpoint", job)
    return True


def _names(signals: list[signal.Signals]) -> str:
    return ", ".join(s.name for s in signals)
