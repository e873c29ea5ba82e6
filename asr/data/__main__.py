"""Data commands, configured like training: ``python -m asr.data {inspect,download} [key=value ...]``.

- ``inspect``: per split, its source, how each part is read, utterances, hours, speakers, duration range,
  character set and skipped items (from the split's manifests, scanned first if needed).
- ``download``: fetch and extract the OpenSLR archives of the configured splits into ``data.root``.
"""

from __future__ import annotations

import logging
import statistics
import sys
from collections import Counter

from hydra.utils import instantiate
from omegaconf import DictConfig

from asr.builders import build_datamodule
from asr.config import compose
from asr.data.download import download_split
from asr.data.librispeech import parts
from asr.data.sources.demo import DemoSource
from asr.data.text import normalize


def inspect(cfg: DictConfig) -> None:
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    source = datamodule.source
    for split in dict.fromkeys([*datamodule.train_splits, *datamodule.val_splits, *datamodule.test_splits]):
        manifests = datamodule.catalog.manifest(split)
        utterances, problems = datamodule.catalog.read(split, split in datamodule.train_splits, manifests)
        skipped = Counter(p.reason for p in problems)
        durations = [u.duration for u in utterances] or [0.0]
        characters = "".join(sorted({c for u in utterances for c in normalize(u.transcript)}))
        print(
            f"{split}: {len(utterances)} utterances, {sum(durations) / 3600:.2f} h, "
            f"{len({u.speaker for u in utterances})} speakers\n"
            f"  from: {', '.join(source.locations(split))}\n"
            f"  read: {'; '.join(source.reading(m) for m in manifests)}\n"
            f"  duration min/mean/max: {min(durations):.2f} / {statistics.mean(durations):.2f} / "
            f"{max(durations):.2f} s\n"
            f"  characters: {characters!r}\n"
            f"  skipped: {sum(skipped.values())} {dict(skipped) if skipped else ''}"
        )


def download(cfg: DictConfig) -> None:
    data = cfg.data
    if isinstance(instantiate(data.source), DemoSource):
        raise SystemExit("data/source=demo is synthesised locally; there is nothing to download")
    splits = [*data.train_splits, *data.val_splits, *data.test_splits]
    for part in dict.fromkeys(part for split in splits for part in parts(split)):
        print(download_split(part, data.root))


COMMANDS = {"inspect": inspect, "download": download}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: python -m asr.data {{{','.join(COMMANDS)}}} [key=value ...]")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    COMMANDS[argv[0]](compose("train", argv[1:]))


if __name__ == "__main__":
    main()
