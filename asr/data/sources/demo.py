"""The synthetic demo corpus (:mod:`asr.data.demo`) as a source: a folder tree, synthesised on first use."""

from __future__ import annotations

from collections.abc import Sequence

from asr.data.demo import DemoCorpusConfig, build_demo_corpus
from asr.data.sources.folder import FolderSource


class DemoSource(FolderSource):
    """The corpus of the settings ``corpus`` (:class:`~asr.data.demo.DemoCorpusConfig`: ``seed``,
    ``train_hours``...) under ``root``, built once and cached."""

    def __init__(self, root: str, scan_workers: int = 8, **corpus) -> None:
        super().__init__(root, scan_workers)
        self.corpus = DemoCorpusConfig(**corpus)

    def prepare(self) -> None:
        build_demo_corpus(self.root, self.corpus)

    def missing(self, splits: Sequence[str]) -> str | None:
        return None  # synthesised by prepare()
