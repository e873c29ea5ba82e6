"""Two CPU processes under DDP, as a user runs it: ``python -m asr.train trainer.devices=2 trainer.strategy=ddp``,
on local archives read by region."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from asr.data.manifest import load_manifest
from asr.data.sources.archive import ArchiveSource
from tests.helpers import TINY_MODEL, make_archive

REPO = Path(__file__).resolve().parents[1]


def one_utterance(demo_root, split, root):
    """``split`` of the demo corpus cut down to its first utterance, under ``root``."""
    audio = min((demo_root / "LibriSpeech" / split).glob("*/*/*.flac"))
    chapter = root / "LibriSpeech" / split / audio.parent.parent.name / audio.parent.name
    chapter.mkdir(parents=True)
    shutil.copy(audio, chapter)
    (transcripts,) = audio.parent.glob("*.trans.txt")
    line = next(line for line in transcripts.read_text().splitlines() if line.startswith(f"{audio.stem} "))
    (chapter / transcripts.name).write_text(line + "\n")
    return root


def test_two_ranks_get_equal_disjoint_regions_of_the_archive(demo_root, tmp_path):
    """Also: a test split of one utterance leaves rank 1 without a batch of it, and the ranks still end the test
    together."""
    archives = tmp_path / "archives"
    archives.mkdir()
    for split in ("train", "dev", "test-seen"):
        make_archive(demo_root, split, archives / f"{split}.tar.gz")
    make_archive(
        one_utterance(demo_root, "test-unseen", tmp_path / "one"), "test-unseen", archives / "test-unseen.tar.gz"
    )
    ids = tmp_path / "ids"
    ids.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "asr.train",
            "experiment=demo",
            f"data.root={archives}",
            "data/source=archive",
            "data.test_splits=[test-seen,test-unseen]",
            "trainer.devices=2",
            "trainer.strategy=ddp",
            "trainer.max_epochs=1",
            "trainer.max_time=null",
            "~logger",
            "+callbacks.ids._target_=tests.ddp_helpers.TrainedIds",
            f"+callbacks.ids.folder={ids}",
            *TINY_MODEL,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert '"test/wer"' in result.stdout and '"test/test-unseen/wer"' in result.stdout
    ranks = [[line.split() for line in (ids / f"rank{r}.txt").read_text().splitlines()] for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) > 0  # equal batch counts: neither rank waits for the other
    trained = [{i for batch in rank for i in batch} for rank in ranks]
    assert not trained[0] & trained[1]
    manifest = load_manifest(
        ArchiveSource(str(archives)),
        str(archives / "train.tar.gz"),
        archives / "manifests" / "train.json",
        verify=False,
    )
    assert manifest.index_file is not None
    order = {u.id: u.index for u in manifest.utterances}
    assert len(trained[0] | trained[1]) > 0.8 * len(order)
    assert max(order[i] for i in trained[0]) < min(order[i] for i in trained[1])  # rank 0 has the first region
