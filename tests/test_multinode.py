"""Two nodes under torchrun, for real, on 127.0.0.1: ``torchrun --nnodes 2 --nproc-per-node 1 --node-rank {0,1} ...
-m asr.train trainer.num_nodes=2 trainer.devices=1``, one process a node, gloo on CPU. The command is the one a
cluster runs on every node; Lightning reads the ranks torchrun gives (its TorchElastic environment)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.helpers import TINY_MODEL

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_torchrun_nodes_train_one_model(demo_root, tmp_path):
    ids = tmp_path / "ids"
    ids.mkdir()
    run_dir = tmp_path / "run"  # the same on both nodes: given, not a timestamp each node picks
    port = free_port()
    train = [
        "-m",
        "asr.train",
        "experiment=demo",
        f"data.root={demo_root}",
        "data/source=folder",
        "trainer.accelerator=cpu",
        "trainer.strategy=ddp",
        "trainer.num_nodes=2",
        "trainer.devices=1",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "trainer.check_val_every_n_epoch=null",
        "trainer.max_time=null",
        "data.num_workers=0",
        "~logger",
        "+callbacks.ids._target_=tests.ddp_helpers.TrainedIds",
        f"+callbacks.ids.folder={ids}",
        f"hydra.run.dir={run_dir}",
        *TINY_MODEL,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
            + ["--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port), *train],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for rank in range(2)
    ]
    try:
        outputs = [node.communicate(timeout=600)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, output in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, output[-3000:]
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in outputs[0] and "GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1]
    ranks = [[line.split() for line in (ids / f"rank{r}.txt").read_text().splitlines()] for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 3  # every step on both nodes
    trained = [{i for batch in rank for i in batch} for rank in ranks]
    assert trained[0] and trained[1] and not trained[0] & trained[1]  # each node its own share of the data
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "val/wer" in metrics and "test/wer" in metrics
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
