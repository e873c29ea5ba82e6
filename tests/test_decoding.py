"""Decoders on hand-made CTC output (greedy; beam search with and without a lexicon and an n-gram LM), and the
decoder seam: a decoder chosen by config reaches the model."""

import pytest
import torch

from asr.builders import build_decoder
from asr.config import compose
from asr.data.text import PAD
from asr.decoding import BeamSearchDecoder, GreedyDecoder, write_lexicon
from asr.lm import kneser_ney, write_arpa


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


def frames_for(tokenizer, spelling: list, blank_between: bool = True) -> list[dict[str, float]]:
    """Per frame, the probabilities of its likely tokens; a character in ``spelling`` is certain, a dict is an
    acoustically ambiguous frame."""
    frames = []
    for item in spelling:
        frames.append(item if isinstance(item, dict) else {item: 1.0})
        if blank_between:
            frames.append({PAD: 1.0})
    return frames


def log_probs(tokenizer, frames: list[dict[str, float]], floor: float = 1e-4) -> torch.Tensor:
    probs = torch.full((1, len(frames), len(tokenizer)), floor)
    for t, likely in enumerate(frames):
        for token, p in likely.items():
            probs[0, t, tokenizer.token_to_id[token]] = p
    return (probs / probs.sum(-1, keepdim=True)).log()


SENTENCES = ["THE CAT SAT"] * 20 + ["A BAT FLEW"] * 5 + ["THE DOG SAT"] * 5


@pytest.fixture(scope="module")
def lm_files(tmp_path_factory):
    """A word 3-gram, a character 5-gram and the lexicon of :data:`SENTENCES`, as asr.lm writes them."""
    folder = tmp_path_factory.mktemp("lm")
    words = [s.split() for s in SENTENCES]
    write_arpa(*kneser_ney(words, 3), folder / "3gram.arpa")
    write_arpa(*kneser_ney([list("|".join(w)) for w in words], 5), folder / "5gram-char.arpa")
    write_lexicon((word for sentence in words for word in sentence), folder / "lexicon.txt")
    return folder


def test_a_language_model_changes_the_answer(tokenizer, lm_files):
    # "B" is heard a little more than "C": the acoustics alone say THE BAT SAT; the LM has only seen THE CAT SAT.
    ambiguous = ["T", "H", "E", "|", {"B": 0.6, "C": 0.4}, "A", "T", "|", "S", "A", "T"]
    logits = log_probs(tokenizer, frames_for(tokenizer, ambiguous))
    lengths = torch.tensor([logits.shape[1]])
    lexicon, words, chars = (str(lm_files / name) for name in ("lexicon.txt", "3gram.arpa", "5gram-char.arpa"))

    assert GreedyDecoder(tokenizer)(logits, lengths) == ["THE BAT SAT"]
    assert BeamSearchDecoder(tokenizer)(logits, lengths) == ["THE BAT SAT"]
    assert BeamSearchDecoder(tokenizer, lexicon=lexicon)(logits, lengths) == ["THE BAT SAT"]  # BAT is a word too
    assert BeamSearchDecoder(tokenizer, lexicon=lexicon, lm=words, lm_weight=0.0)(logits, lengths) == ["THE BAT SAT"]
    assert BeamSearchDecoder(tokenizer, lexicon=lexicon, lm=words)(logits, lengths) == ["THE CAT SAT"]
    # Lexicon-free, with a model of the characters: its tokens must be scored as themselves.
    assert BeamSearchDecoder(tokenizer, lm=chars)(logits, lengths) == ["THE CAT SAT"]
    assert BeamSearchDecoder(tokenizer, lm=chars, lm_weight=0.0)(logits, lengths) == ["THE BAT SAT"]


def test_a_lexicon_decodes_only_its_words_and_keeps_the_last_one(tokenizer, lm_files):
    # No blank between the letters and none after the last one; "Q" is heard more than "T" at the end.
    spelling = ["T", "H", "E", "|", "D", "O", "G", "|", "S", "A", {"Q": 0.6, "T": 0.4}]
    logits = log_probs(tokenizer, frames_for(tokenizer, spelling, blank_between=False))
    lengths = torch.tensor([logits.shape[1]])
    assert GreedyDecoder(tokenizer)(logits, lengths) == ["THE DOG SAQ"]
    assert BeamSearchDecoder(tokenizer, lexicon=str(lm_files / "lexicon.txt"))(logits, lengths) == ["THE DOG SAT"]


def test_beam_search_without_a_model_agrees_with_greedy_on_peaked_logits(tokenizer):
    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor([40, 25, 1, 33])
    ids = torch.randint(0, len(tokenizer), (4, 40), generator=generator)
    ids[torch.rand(ids.shape, generator=generator) < 0.4] = tokenizer.pad_id
    logits = torch.nn.functional.one_hot(ids, len(tokenizer)).float() * 10
    logits[1, 25:] = torch.randn(15, len(tokenizer), generator=generator) * 100  # padding: must not be read
    expected = GreedyDecoder(tokenizer)(logits, lengths)
    assert len(set(expected)) == 4 and all(expected[:2])
    beam = BeamSearchDecoder(tokenizer, beam_size=8)
    assert beam(logits, lengths) == expected
    assert beam(logits.to(torch.bfloat16), lengths.to(torch.int32)) == expected


def test_lexicon_format(tmp_path):
    assert write_lexicon(["CAT", "A", "DON'T", "CAT"], tmp_path / "lexicon.txt") == 3
    assert (tmp_path / "lexicon.txt").read_text().splitlines() == ["A A |", "CAT C A T |", "DON'T D O N ' T |"]


def test_bad_decoder_settings_are_clear_errors(tokenizer, lm_files, tmp_path):
    (tmp_path / "lower.txt").write_text("CAT C A T |\nhello h e l l o |\n")
    with pytest.raises(ValueError, match=r"lower\.txt, line 2: 'hello' is spelled with e, h, l, o, not in"):
        BeamSearchDecoder(tokenizer, lexicon=str(tmp_path / "lower.txt"))
    with pytest.raises(ValueError, match=r"decoder\.lm=.*missing\.arpa: no such file"):
        BeamSearchDecoder(tokenizer, lm=str(tmp_path / "missing.arpa"))
    (tmp_path / "junk.arpa").write_text("not a language model\n")
    with pytest.raises(ValueError, match=r"junk\.arpa: not a KenLM model"):
        BeamSearchDecoder(tokenizer, lm=str(tmp_path / "junk.arpa"), lexicon=str(lm_files / "lexicon.txt"))
    with pytest.raises(ValueError, match="looks like a word model; give the lexicon"):
        BeamSearchDecoder(tokenizer, lm=str(lm_files / "3gram.arpa"))
    with pytest.raises(ValueError, match="word_score is added per word of a lexicon"):
        BeamSearchDecoder(tokenizer, word_score=-1.0)


def test_beam_search_is_chosen_by_config(tokenizer, tmp_path):
    assert isinstance(build_decoder(compose("train", ["decoder=beam"]), tokenizer), BeamSearchDecoder)
    cfg = compose("train", ["decoder=beam_lm", f"data.root={tmp_path}"])
    assert (cfg.decoder.lm, cfg.decoder.lexicon) == (f"{tmp_path}/lm/3gram.arpa", f"{tmp_path}/lm/lexicon.txt")
