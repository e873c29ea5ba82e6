"""Decoders on hand-made CTC output, and the decoder seam: a decoder chosen by config reaches the model."""

import torch

from asr.builders import build_decoder
from asr.config import compose
from asr.decoding import GreedyDecoder


def one_hot_logits(tokenizer, frames: list[int]) -> torch.Tensor:
    logits = torch.full((1, len(frames), len(tokenizer)), -5.0)
    logits[0, torch.arange(len(frames)), torch.tensor(frames)] = 5.0
    return logits


def test_greedy_collapses_repeats_and_drops_blanks(tokenizer):
    blank, h, i, sep = tokenizer.pad_id, *(tokenizer.token_to_id[c] for c in "HI|")
    # frames: H H _ I | | H _ _ I I _ H -> "HI HI"; a repeat only counts once unless a blank separates it
    frames = [h, h, blank, i, sep, sep, h, blank, blank, i, i, blank, h]
    decode = GreedyDecoder(tokenizer)
    logits = one_hot_logits(tokenizer, frames)
    assert decode(logits, torch.tensor([12])) == ["HI HI"]
    assert decode(logits, torch.tensor([13])) == ["HI HIH"]
    assert decode(one_hot_logits(tokenizer, [h, blank, h, i]), torch.tensor([4])) == ["HHI"]


class ShoutingDecoder:
    """A decoder defined outside the package, as a user would add one."""

    def __init__(self, tokenizer, suffix: str) -> None:
        self.greedy = GreedyDecoder(tokenizer)
        self.suffix = suffix

    def __call__(self, logits, lengths):
        return [text + self.suffix for text in self.greedy(logits, lengths)]


def test_a_decoder_is_chosen_by_config(tokenizer):
    cfg = compose("train", ["decoder._target_=tests.test_decoding.ShoutingDecoder", "+decoder.suffix=?"])
    decoder = build_decoder(cfg, tokenizer)
    h = tokenizer.token_to_id["H"]
    assert decoder(one_hot_logits(tokenizer, [h, h]), torch.tensor([2])) == ["H?"]
    assert isinstance(build_decoder(compose("train"), tokenizer), GreedyDecoder)
