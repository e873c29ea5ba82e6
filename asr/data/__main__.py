"""Data commands, configured like training: ``python -m asr.data {inspect,download} [key=value ...]``.

- ``inspect``: per split, its source, how each part is read, utterances, hours, speakers, duration range,
  character set and the unusable utterances, the first few of each reason named and all of them listed in a file
  (``skipped.tsv``, or ``data.skip_list``); from the split's manifests, scanned first if needed, and with
  ``data.verify=true`` every file decoded once first.
- ``download``: fetch and extract the OpenSLR archives of the configured splits into ``data.root``.
- ``download-lm``: fetch LibriSpeech's language-model resources (OpenSLR 11: the 4-gram ARPA and the pronunciation
  lexicon) into ``data.root/lm``, and write the lexicon of the LM's words spelled in the model's tokens,
  ``librispeech-lexicon-letters.txt``, for ``decoder=beam_4gram``.
"""

from __future__ import annotations

import logging
import statistics
import sys
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from asr.builders import build_datamodule
from asr.config import compose
from asr.data.download import LM_LEXICON, LM_SIZES, OPENSLR_LM_URL, download_split, fetch_lm, lexicon_words
from asr.data.librispeech import Problem, parts
from asr.data.skips import COLUMNS, describe, write_list
from asr.data.sources.demo import DemoSource
from asr.data.text import CharTokenizer, normalize
from asr.decoding import write_lexicon


def inspect(cfg: DictConfig) -> None:
    """Per split, what it holds and the unusable utterances, the first few of each reason named; all of them listed
    in ``data.skip_list`` (default ``skipped.tsv`` here). ``data.verify=true`` decodes every file first."""
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    source = datamodule.source
    unusable: list[tuple[str, Problem]] = []
    for split in dict.fromkeys([*datamodule.train_splits, *datamodule.val_splits, *datamodule.test_splits]):
        manifests = datamodule.catalog.manifest(split)
        utterances, problems = datamodule.catalog.read(split, split in datamodule.train_splits, manifests)
        unusable += [(split, p) for p in problems]
        durations = [u.duration for u in utterances] or [0.0]
        characters = "".join(sorted({c for u in utterances for c in normalize(u.transcript)}))
        verified = f"{sum(len(m.verified) for m in manifests)} files decoded whole"
        if not cfg.data.verify:
            verified += " (data.verify=true decodes every file)"
        print(
            f"{split}: {len(utterances)} utterances, {sum(durations) / 3600:.2f} h, "
            f"{len({u.speaker for u in utterances})} speakers\n"
            f"  from: {', '.join(source.locations(split))}\n"
            f"  read: {'; '.join(source.reading(m) for m in manifests)}\n"
            f"  verified: {verified}\n"
            f"  duration min/mean/max: {min(durations):.2f} / {statistics.mean(durations):.2f} / "
            f"{max(durations):.2f} s\n"
            f"  characters: {characters!r}\n"
            f"  skipped: {len(problems)}"
        )
        if problems:
            print(describe(problems, indent="    "))
    path = Path(cfg.data.skip_list or "skipped.tsv").expanduser()
    write_list(unusable, path)
    print(f"{len(unusable)} unusable utterances listed in {path.absolute()} ({', '.join(COLUMNS)}; tab-separated)")


def _not_demo(data: DictConfig, hint: str = "") -> None:
    if isinstance(instantiate(data.source), DemoSource):
        raise SystemExit(f"data/source=demo is synthesised locally; there is nothing to download{hint}")


def download(cfg: DictConfig) -> None:
    data = cfg.data
    _not_demo(data)
    splits = [*data.train_splits, *data.val_splits, *data.test_splits]
    for part in dict.fromkeys(part for split in splits for part in parts(split)):
        print(download_split(part, data.root))


def download_lm(cfg: DictConfig, base_url: str = OPENSLR_LM_URL, sizes: dict[str, int] = LM_SIZES) -> None:
    _not_demo(cfg.data, " (its LM is built from its transcripts: python -m asr.lm experiment=demo)")
    fetched = fetch_lm(f"{cfg.data.root}/lm", base_url, sizes)
    tokenizer, words = CharTokenizer(), lexicon_words(fetched[LM_LEXICON])
    spelled = [word for word in words if not tokenizer.unknown_characters(word)]
    lexicon = fetched[LM_LEXICON].with_name("librispeech-lexicon-letters.txt")
    write_lexicon(spelled, lexicon)
    print(*fetched.values(), f"{lexicon}: {len(spelled)} words", sep="\n", end="")
    print(f" ({len(words) - len(spelled)} with other characters left out)" if len(spelled) < len(words) else "")


COMMANDS = {"inspect": inspect, "download": download, "download-lm": download_lm}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: python -m asr.data {{{','.join(COMMANDS)}}} [key=value ...]")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    COMMANDS[argv[0]](compose("train", argv[1:]))


if __name__ == "__main__":
    main()
