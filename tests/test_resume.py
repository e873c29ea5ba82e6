"""Exact resume and preemption, as a user meets them: ``python -m asr.train`` killed (SIGKILL) right after a mid-epoch
checkpoint, or signalled (SIGTERM, SIGUSR1) in the middle of a step, then started again, ends with the weights of a
run never interrupted, bit for bit, having trained on the same batches in the same order: no utterance twice, none
missed. With 1 process and DataLoader workers, and with 2 DDP ranks (CPU, gloo). Every run augments its batches
(speed perturbation and noise on each utterance), whose draws must resume as exactly as the data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.helpers import TINY_MODEL, run_train

STEPS = 24  # the demo fixture's epoch is about 17 steps: the resumed runs cross an epoch boundary and its validation
EVERY = 5  # mid-epoch checkpoints at steps 5, 10, ...
AUGMENT = ("augment=speed_noise", "augment.noise.p=1.0")


def train(demo_root, run_dir: Path, *overrides, ids: str = "ids", env: dict | None = None, cwd: Path | None = None):
    """``python -m asr.train`` for ``STEPS`` steps, the batches of each rank logged under ``<run_dir>-<ids>/``."""
    return run_train(
        "experiment=demo",
        f"data.root={demo_root}",
        "data/source=folder",
        "trainer.max_time=null",
        f"trainer.max_steps={STEPS}",
        "+trainer.limit_test_batches=0",
        "~logger",
        f"callbacks.periodic.every_n_train_steps={EVERY}",
        "+callbacks.steps._target_=tests.resume_helpers.StepLog",
        f"+callbacks.steps.folder={run_dir.parent / f'{run_dir.name}-{ids}'}",
        *TINY_MODEL,
        *AUGMENT,
        *([] if cwd else [f"hydra.run.dir={run_dir}"]),
        *overrides,
        cwd=cwd or run_dir.parent,
        env=env,
    )


def steps_of(run_dir: Path, rank: int, ids: str = "ids", upto: int | None = None) -> list[tuple[int, int, tuple]]:
    """Each micro-batch a rank started: (its optimizer step, its epoch, its utterance ids), up to step ``upto``."""
    lines = (run_dir.parent / f"{run_dir.name}-{ids}" / f"rank{rank}.txt").read_text().splitlines()
    steps = [(int(step), int(epoch), tuple(rest)) for step, epoch, *rest in (line.split() for line in lines)]
    return [s for s in steps if upto is None or s[0] <= upto]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def assert_bit_identical(path: Path, reference: Path) -> None:
    ours, theirs = weights(path), weights(reference)
    assert ours.keys() == theirs.keys()
    different = [name for name in theirs if not torch.equal(ours[name], theirs[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def assert_same_batches(resumed: list, reference: list) -> None:
    """The same batches in the same order; within an epoch, no utterance twice."""
    assert resumed == reference
    for epoch in {e for _, e, _ in reference}:
        ids = [i for _, e, batch in reference if e == epoch for i in batch]
        assert len(ids) == len(set(ids)), epoch


@pytest.fixture(scope="module")
def reference(demo_root, tmp_path_factory) -> Path:
    """The run never interrupted (1 process, 2 DataLoader workers)."""
    run_dir = tmp_path_factory.mktemp("resume") / "reference"
    result = train(demo_root, run_dir, "data.num_workers=2")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_killed_after_a_mid_epoch_checkpoint_resumes_bit_identical(demo_root, reference, tmp_path):
    run_dir = tmp_path / "run"
    killed = train(demo_root, run_dir, "data.num_workers=2", "+callbacks.steps.kill_in_step=6", ids="killed")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step5.ckpt"]

    # The checkpoint's name as the run wrote it, as Hydra's override grammar takes it (no "=" in it).
    step5 = run_dir / "checkpoints" / "step5.ckpt"
    resumed = train(demo_root, run_dir, "data.num_workers=2", f"ckpt_path={step5}", ids="resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from {step5} (global step 5)" in resumed.stdout
    assert_bit_identical(run_dir / "checkpoints" / "final.ckpt", reference / "checkpoints" / "final.ckpt")
    trained = steps_of(run_dir, 0, "killed", upto=5) + steps_of(run_dir, 0, "resumed")
    assert_same_batches(trained, steps_of(reference, 0))
    assert not [p.name for p in (run_dir / "checkpoints").iterdir() if "=" in p.name]
    # The newest two are kept; Lightning never deletes the checkpoint a run resumed from.
    assert {p.name for p in (run_dir / "checkpoints").glob("step*.ckpt")} == {
        "step5.ckpt",
        "step15.ckpt",
        "step20.ckpt",
    }


def fake_scontrol(folder: Path) -> dict[str, str]:
    """A ``scontrol`` on PATH that records its arguments in ``folder/scontrol.log``."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> {folder / "scontrol.log"}\n')
    script.chmod(0o755)
    return {"PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


def test_a_slurm_warning_mid_step_checkpoints_requeues_and_the_next_start_resumes(demo_root, reference, tmp_path):
    """SIGUSR1 (sbatch --signal=USR1@...) in step 6 of SLURM job 4242: step 6 ends, checkpoints/last.ckpt is written,
    ``scontrol requeue 4242`` is called, the run exits with 128 + 10. The requeued job runs the same command: its
    run folder is named after the job, so ckpt_path=last finds the checkpoint."""
    slurm = {"SLURM_JOB_ID": "4242", **fake_scontrol(tmp_path / "bin")}
    run_dir = tmp_path / "outputs" / "4242"
    signalled = train(
        demo_root,
        run_dir,
        "+callbacks.steps.kill_in_step=6",
        "+callbacks.steps.signal=SIGUSR1",
        "ckpt_path=last",
        ids="signalled",
        env=slurm,
        cwd=tmp_path,
    )
    assert signalled.returncode == 128 + 10, signalled.stderr[-3000:]
    log = signalled.stdout + signalled.stderr
    assert "SIGUSR1 received: training stops after the step under way, with a checkpoint" in log
    assert f"SIGUSR1: stopped after step 6 (epoch 0), checkpoint {run_dir / 'checkpoints' / 'last.ckpt'}" in log
    assert "SLURM job 4242 requeued" in log
    assert (tmp_path / "bin" / "scontrol.log").read_text() == "requeue 4242\n"
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6

    requeued = train(demo_root, run_dir, "ckpt_path=last", ids="requeued", env=slurm, cwd=tmp_path)
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert f"ckpt_path=last: resuming from {run_dir / 'checkpoints' / 'last.ckpt'}" in requeued.stdout
    assert_bit_identical(run_dir / "checkpoints" / "final.ckpt", reference / "checkpoints" / "final.ckpt")
    trained = steps_of(run_dir, 0, "signalled", upto=6) + steps_of(run_dir, 0, "requeued")
    assert_same_batches(trained, steps_of(reference, 0))


@pytest.mark.slow
def test_two_ddp_ranks_killed_or_one_terminated_resume_bit_identical(demo_root, tmp_path):
    """2 CPU ranks, 1 worker each: SIGKILL of both in step 6 after the step-5 checkpoint, resumed from its path; and
    SIGTERM to rank 0 alone in step 6, which stops both ranks after step 6 with last.ckpt, resumed with
    ckpt_path=last. Both end with the weights of the run never interrupted, each rank with its batches."""
    ddp = ("trainer.devices=2", "trainer.strategy=ddp", "data.num_workers=1")
    reference = tmp_path / "reference"
    result = train(demo_root, reference, *ddp)
    assert result.returncode == 0, result.stderr[-3000:]

    killed = tmp_path / "killed"
    result = train(demo_root, killed, *ddp, "+callbacks.steps.kill_in_step=6", ids="stopped")
    assert result.returncode == -9, result.stderr[-3000:]
    result = train(demo_root, killed, *ddp, f"ckpt_path={killed / 'checkpoints' / 'step5.ckpt'}", ids="resumed")
    assert result.returncode == 0, result.stderr[-3000:]

    terminated = tmp_path / "terminated"
    result = train(
        demo_root,
        terminated,
        *ddp,
        "+callbacks.steps.kill_in_step=6",
        "+callbacks.steps.signal=SIGTERM",
        "+callbacks.steps.rank=0",
        ids="stopped",
    )
    assert result.returncode == 128 + 15, result.stderr[-3000:]
    assert "SIGTERM: stopped after step 6 (epoch 0)" in result.stdout
    result = train(demo_root, terminated, *ddp, "ckpt_path=last", ids="resumed")
    assert result.returncode == 0, result.stderr[-3000:]

    for run_dir, step in ((killed, 5), (terminated, 6)):
        assert_bit_identical(run_dir / "checkpoints" / "final.ckpt", reference / "checkpoints" / "final.ckpt")
        for rank in range(2):
            trained = steps_of(run_dir, rank, "stopped", upto=step) + steps_of(run_dir, rank, "resumed")
            assert_same_batches(trained, steps_of(reference, rank))
