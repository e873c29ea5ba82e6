"""Data sources: where a split's utterances are listed from and their audio read (``data/source=...``)."""

from asr.data.sources.base import Source

__all__ = ["Source"]
