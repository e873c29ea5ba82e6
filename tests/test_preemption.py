"""Preemption in process, on a toy module: a signal in the middle of a step ends training after that optimizer step
with a checkpoint, then exits with 128 + the signal; under SLURM a requeue signal runs ``scontrol requeue`` (a fake
one on PATH records its arguments). The run as a user meets it, and its exact resume: tests/test_resume.py."""

from __future__ import annotations

import os
import signal

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from asr.preemption import Preempted, Preemption
from tests.helpers import quiet_trainer

SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID")


class Toy(L.LightningModule):
    """A linear regression that sends itself ``signum`` during batch ``signal_at`` (0-based), after its backward."""

    def __init__(self, signum: signal.Signals, signal_at: int) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.signum, self.signal_at, self.batches = signum, signal_at, 0

    def training_step(self, batch, batch_idx):
        return (self.layer(batch) ** 2).mean()

    def on_after_backward(self) -> None:
        if self.batches == self.signal_at:
            os.kill(os.getpid(), self.signum)
        self.batches += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.fixture
def scontrol(tmp_path, monkeypatch):
    """A fake ``scontrol`` first on PATH; yields the file it appends its arguments to."""
    for name in SLURM_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    calls = tmp_path / "scontrol.log"
    script = tmp_path / "bin" / "scontrol"
    script.parent.mkdir()
    script.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")
    return calls


def fit(tmp_path, signum, signal_at=2, accumulate=1) -> tuple[Preempted, Preemption]:
    callback = Preemption(str(tmp_path / "checkpoints"))
    trainer = quiet_trainer(
        max_steps=10,
        accumulate_grad_batches=accumulate,
        callbacks=[callback],
    )
    data = DataLoader(list(torch.randn(40, 4)), batch_size=2)
    with pytest.raises(Preempted) as stopped:
        trainer.fit(Toy(signum, signal_at), train_dataloaders=data)
    return stopped.value, callback


def test_sigterm_mid_step_ends_that_step_writes_a_checkpoint_and_exits_143(tmp_path, scontrol, caplog):
    before = signal.getsignal(signal.SIGTERM)
    stopped, callback = fit(tmp_path, signal.SIGTERM, signal_at=2)
    assert stopped.code == 143
    checkpoint = torch.load(callback.path, weights_only=True)
    assert checkpoint["global_step"] == 3  # the step under way (the third) was finished, not abandoned
    assert checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"] == 3
    assert "SIGTERM received: training stops after the step under way" in caplog.text
    assert f"SIGTERM: stopped after step 3 (epoch 0), checkpoint {callback.path}" in caplog.text
    assert not scontrol.exists()  # not a SLURM job
    assert signal.getsignal(signal.SIGTERM) == before  # the handlers from before fit are back


def test_mid_accumulation_the_stop_waits_for_the_optimizer_step(tmp_path, scontrol):
    stopped, callback = fit(tmp_path, signal.SIGTERM, signal_at=0, accumulate=2)
    checkpoint = torch.load(callback.path, weights_only=True)
    assert (checkpoint["global_step"], stopped.code) == (1, 143)
    assert checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"] == 2


def test_under_slurm_the_warning_signal_requeues_the_job(tmp_path, scontrol, monkeypatch, caplog):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    stopped, _ = fit(tmp_path, signal.SIGUSR1)
    assert stopped.code == 128 + 10
    assert scontrol.read_text() == "requeue 4242\n"
    assert "SLURM job 4242 requeued" in caplog.text


def test_a_job_array_task_is_requeued_by_its_array_id(tmp_path, scontrol, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4250")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    fit(tmp_path, signal.SIGUSR2)  # submitit's warning signal
    assert scontrol.read_text() == "requeue 4242_7\n"


def test_under_slurm_sigterm_is_a_cancel_not_a_requeue(tmp_path, scontrol, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    stopped, callback = fit(tmp_path, signal.SIGTERM)
    assert stopped.code == 143 and callback.path.is_file()
    assert not scontrol.exists()


def test_a_failed_requeue_is_logged_and_the_run_still_exits(tmp_path, scontrol, monkeypatch, caplog):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    (tmp_path / "bin" / "scontrol").write_text("#!/bin/sh\necho 'Invalid job id' >&2\nexit 1\n")
    stopped, _ = fit(tmp_path, signal.SIGUSR1)
    assert stopped.code == 138
    assert "SLURM job 4242 not requeued: scontrol requeue exited 1: Invalid job id" in caplog.text
