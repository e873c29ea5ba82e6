"""Transcript normalisation and the character vocabulary shared by data, model and decoding."""

from __future__ import annotations

import json
import re
from pathlib import Path

PAD, BOS, EOS, UNK, WORD_DELIMITER = "<pad>", "<s>", "</s>", "<unk>", "|"
# Same layout as the vocab.json of facebook/wav2vec2-base-960h and the hubert-*-ft checkpoints, so ids
# line up with transformers' Wav2Vec2CTCTokenizer and with published CTC heads.
CHARACTERS = tuple("ETAONIHSRDLUMWCFGYPBVK'XJQZ")
VOCAB = (PAD, BOS, EOS, UNK, WORD_DELIMITER, *CHARACTERS)

_NOT_IN_ALPHABET = re.compile(r"[^A-Z' ]+")
_SPACES = re.compile(r"\s+")


def canonical(text: str) -> str:
    """Upper case, typographic apostrophes as ASCII ones, hyphens as spaces: what is left outside the alphabet
    is what :func:`normalize` would strip."""
    return text.upper().replace("’", "'").replace("-", " ")


def normalize(text: str) -> str:
    """LibriSpeech style: upper case, letters and apostrophes, single spaces."""
    text = _NOT_IN_ALPHABET.sub(" ", canonical(text))
    return _SPACES.sub(" ", text).strip()


class CharTokenizer:
    """Character CTC tokenizer; the blank is the pad token, as in transformers' CTC models."""

    def __init__(self, vocab: tuple[str, ...] = VOCAB) -> None:
        self.vocab = vocab
        self.token_to_id = {tok: i for i, tok in enumerate(vocab)}
        self.pad_id = self.token_to_id[PAD]
        self.unk_id = self.token_to_id[UNK]
        self.delimiter_id = self.token_to_id[WORD_DELIMITER]
        self.characters = {t for t in vocab if len(t) == 1 and t != WORD_DELIMITER}

    def __len__(self) -> int:
        return len(self.vocab)

    def unknown_characters(self, text: str) -> set[str]:
        return {c for c in text if c != " " and c not in self.characters}

    def encode(self, text: str) -> list[int]:
        """Encode a normalised transcript; spaces become the word delimiter."""
        return [self.delimiter_id if c == " " else self.token_to_id.get(c, self.unk_id) for c in text]

    def decode(self, ids: list[int]) -> str:
        specials = {self.pad_id, self.token_to_id[BOS], self.token_to_id[EOS]}
        chars = [" " if i == self.delimiter_id else self.vocab[i] for i in ids if i not in specials]
        return _SPACES.sub(" ", "".join(chars)).strip()

    def save(self, directory: str | Path) -> Path:
        """Write vocab.json in the format of transformers' Wav2Vec2CTCTokenizer."""
        path = Path(directory) / "vocab.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.token_to_id, indent=1))
        return path
