"""Decoders: CTC output (logits and valid frames per utterance) to text, chosen with ``decoder=...``.

A decoder is a callable ``decoder(logits, lengths) -> list[str]``; ``conf/decoder/<name>.yaml`` builds it with the
tokenizer (``asr.builders.build_decoder``).
"""

from __future__ import annotations

from typing import Protocol

import torch

from asr.data.text import CharTokenizer


class Decoder(Protocol):
    def __call__(self, logits: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        """Transcripts of a batch: ``logits`` (batch, frames, vocab), ``lengths`` the valid frames of each."""
        ...


class GreedyDecoder:
    """Best path: the most likely token of each frame, repeats collapsed, blanks dropped."""

    def __init__(self, tokenizer: CharTokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, logits: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        best = logits.argmax(dim=-1).cpu().tolist()
        return [self.decode_ids(ids[:n]) for ids, n in zip(best, lengths.cpu().tolist(), strict=True)]

    def decode_ids(self, ids: list[int]) -> str:
        collapsed = [i for k, i in enumerate(ids) if k == 0 or i != ids[k - 1]]
        return self.tokenizer.decode([i for i in collapsed if i != self.tokenizer.pad_id])
