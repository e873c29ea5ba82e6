"""The same seed and config give the same run on CPU: ``python -m asr.train`` twice, identical losses at every step
and identical final weights. (On GPU some kernels are not deterministic: docs/fault-tolerance.md.)"""

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch

from tests.helpers import REPO, TINY_MODEL

STEPS = 4


class StepLosses(L.Callback):
    """Appends each training step's loss, exactly (``float.hex``), to ``path``, a line a step."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        with open(self.path, "a") as f:
            f.write(f"{trainer.global_step} {float(outputs['loss']).hex()}\n")


def start(demo_root: Path, folder: Path) -> subprocess.Popen:
    folder.mkdir()
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "asr.train",
            "experiment=demo",
            f"data.root={demo_root}",
            "data/source=folder",
            f"trainer.max_steps={STEPS}",
            "trainer.max_time=null",
            "+trainer.limit_val_batches=0",
            "+trainer.limit_test_batches=1",
            "~logger",
            "+callbacks.losses._target_=tests.test_determinism.StepLosses",
            f"+callbacks.losses.path={folder / 'losses.txt'}",
            *TINY_MODEL,
        ],
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)},
    )


def finished(run: subprocess.Popen, folder: Path) -> tuple[list[str], dict]:
    _, stderr = run.communicate(timeout=600)
    assert run.returncode == 0, stderr[-3000:]
    (final,) = folder.glob("outputs/*/*/checkpoints/final.ckpt")
    return (folder / "losses.txt").read_text().splitlines(), torch.load(final, weights_only=True)["state_dict"]


def test_the_same_seed_and_config_give_the_same_losses_and_weights_on_cpu(demo_root, tmp_path):
    folders = [tmp_path / "first", tmp_path / "second"]
    runs = [start(demo_root, folder) for folder in folders]  # side by side: the test takes the time of one
    (losses, weights), (again, weights_again) = map(finished, runs, folders)
    assert len(losses) == STEPS
    assert again == losses
    assert weights.keys() == weights_again.keys()
    assert all(torch.equal(weights[k], weights_again[k]) for k in weights)
