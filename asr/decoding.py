"""Decoders: CTC output (logits and valid frames per utterance) to text, chosen with ``decoder=...``.

A decoder is a callable ``decoder(logits, lengths) -> list[str]``; ``conf/decoder/<name>.yaml`` builds it with the
tokenizer (``asr.builders.build_decoder``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import torch

from asr.data.text import PAD, WORD_DELIMITER, CharTokenizer

# A frame no path goes through: finite, so that flashlight's log-add of two such scores stays a number.
_IMPOSSIBLE = -1e4


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


def lexicon_line(word: str) -> str:
    """A word and its spelling in the tokens, ended by the word delimiter: ``WORD W O R D |``."""
    return f"{word} {' '.join(word)} {WORD_DELIMITER}"


def write_lexicon(words: Iterable[str], path: str | Path) -> int:
    """Write the lexicon of ``words`` (sorted, once each) for :class:`BeamSearchDecoder`; returns its size."""
    words = sorted(set(words))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lexicon_line(word) + "\n" for word in words))
    return len(words)


def _existing(path: str | Path, key: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"decoder.{key}={path}: no such file")
    return path


def _check_lexicon(path: Path, tokens: tuple[str, ...]) -> None:
    """The spellings must be in the model's tokens (flashlight would stop at the first other one, unnamed)."""
    known = set(tokens)
    with path.open() as f:
        for number, line in enumerate(f, 1):
            word, *spelling = line.split()
            if not spelling or not known.issuperset(spelling):
                unknown = sorted(set(spelling) - known) or ["(no spelling)"]
                raise ValueError(
                    f"decoder.lexicon={path}, line {number}: {word!r} is spelled with {', '.join(unknown)}, not in "
                    f"the model's tokens {' '.join(tokens)}; a line is a word and its tokens, e.g. "
                    f"{lexicon_line('WORD')!r}"
                )


class BeamSearchDecoder:
    """CTC beam search of flashlight-text (``torchaudio.models.decoder.ctc_decoder``), with an optional KenLM n-gram
    model (ARPA, gzipped ARPA or binary) and an optional lexicon.

    With a lexicon, only its words are spelled, the LM (if any) scores words, and each word gets ``word_score``.
    Without one, decoding is open-vocabulary and the LM scores each token: it must be a model over the tokens, with
    ``|`` between words (``python -m asr.lm lm.unit=char``); a word model needs the lexicon of its words.
    """

    def __init__(
        self,
        tokenizer: CharTokenizer,
        beam_size: int = 50,
        lm: str | None = None,
        lexicon: str | None = None,
        lm_weight: float = 2.0,
        word_score: float = 0.0,
        beam_size_token: int | None = 8,
        beam_threshold: float = 50.0,
        log_add: bool = True,
    ) -> None:
        from torchaudio.models.decoder import ctc_decoder

        self.tokenizer = tokenizer
        tokens = tuple(tokenizer.vocab)
        lexicon_path = _existing(lexicon, "lexicon") if lexicon else None
        if lexicon_path is not None:
            _check_lexicon(lexicon_path, tokens)
        elif word_score:
            raise ValueError("decoder.word_score is added per word of a lexicon: give decoder.lexicon, or leave it 0")
        model = None
        if lm:
            lm_path = _existing(lm, "lm")
            # With a lexicon, ctc_decoder maps the LM's words to the lexicon's. Without one it would give the LM a
            # dictionary of the tokens in another order than theirs (flashlight's create_word_dict goes through an
            # unordered map), so token n would be scored as another one: the tokens' own dictionary is given here.
            model = str(lm_path) if lexicon_path is not None else _token_lm(lm_path, tokens)
        self.with_lexicon = lexicon_path is not None
        try:
            self.decoder = ctc_decoder(
                lexicon=str(lexicon_path) if lexicon_path is not None else None,
                tokens=list(tokens),
                lm=model,
                beam_size=beam_size,
                beam_size_token=beam_size_token,
                beam_threshold=beam_threshold,
                lm_weight=lm_weight,
                word_score=word_score,
                log_add=log_add,
                blank_token=PAD,
                sil_token=WORD_DELIMITER,
            )
        except RuntimeError as err:  # KenLM's loader: a file that is no LM
            raise ValueError(f"decoder.lm={lm}: not a KenLM model (ARPA or binary): {err}") from err

    def __call__(self, logits: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        emissions = logits.detach().float().log_softmax(dim=-1).cpu()
        lengths = lengths.detach().cpu().to(torch.int64)
        if self.with_lexicon:
            emissions, lengths = self._end_last_word(emissions, lengths)
        results = self.decoder(emissions.contiguous(), lengths)
        return [self.tokenizer.decode(best[0].tokens.tolist()) if best else "" for best in results]

    def _end_last_word(self, emissions: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A frame of the word delimiter after each utterance's last one. Lexicon words end with ``|`` and are
        only emitted there, but the model is trained on transcripts without a final ``|``: the last word would be
        lost."""
        batch, frames, vocab = emissions.shape
        ended = emissions.new_full((batch, frames + 1, vocab), _IMPOSSIBLE)
        ended[:, :frames] = emissions
        rows = torch.arange(batch)
        ended[rows, lengths] = _IMPOSSIBLE
        ended[rows, lengths, self.tokenizer.delimiter_id] = 0.0
        return ended, lengths + 1


def _token_lm(path: Path, tokens: tuple[str, ...]):
    """A KenLM model that scores the tokens, by index; an error if ``|`` is not one of its words (then it is a
    word model, which would score every token as unknown)."""
    from flashlight.lib.text.decoder.kenlm import KenLM
    from flashlight.lib.text.dictionary import Dictionary

    try:
        model = KenLM(str(path), Dictionary(list(tokens)))
    except RuntimeError as err:
        raise ValueError(f"decoder.lm={path}: not a KenLM model (ARPA or binary): {err}") from err
    start = model.start(False)
    unknown = model.score(start, tokens.index(PAD))[1]  # the blank is never an LM word: this is <unk>'s score
    if model.score(start, tokens.index(WORD_DELIMITER))[1] == unknown:
        raise ValueError(
            f"decoder.lm={path}: without decoder.lexicon the LM scores tokens, but {WORD_DELIMITER!r} is not one of "
            "its words: it looks like a word model; give the lexicon of its words (decoder.lexicon), or a model "
            "over the tokens (python -m asr.lm lm.unit=char)"
        )
    return model
