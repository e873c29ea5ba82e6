"""The n-gram LM writer (interpolated Kneser-Ney in ARPA, checked by loading it in flashlight-text's KenLM, as
decoding does) and `python -m asr.lm`."""

import random

import pytest
from flashlight.lib.text.decoder.kenlm import KenLM
from flashlight.lib.text.dictionary import Dictionary

from asr.data.text import normalize
from asr.lm import BOS, EOS, kneser_ney, main, write_arpa

WORDS = "THE CAT SAT ON A MAT DOG RAN".split()


class Scorer:
    """log10 probabilities of a KenLM model; words it does not know are its <unk>."""

    def __init__(self, path, words):
        self.words = list(words)
        self.model = KenLM(str(path), Dictionary(self.words))

    def state(self, context: tuple[str, ...]):
        state = self.model.start(context[:1] != (BOS,))  # start with nothing, or with <s>
        for word in context[context[:1] == (BOS,) :]:
            state, _ = self.model.score(state, self.words.index(word))
        return state

    def log10(self, context: tuple[str, ...], word: str) -> float:
        state = self.state(context)
        return self.model.finish(state)[1] if word == EOS else self.model.score(state, self.words.index(word))[1]

    def sentence(self, words: list[str]) -> float:
        return sum(self.log10((BOS, *words[:i]), w) for i, w in enumerate([*words, EOS]))


def random_sentences(n=300, seed=0):
    rng = random.Random(seed)
    return [[rng.choice(WORDS) for _ in range(rng.randint(1, 6))] for _ in range(n)]


@pytest.mark.parametrize("order", [2, 3, 4])
def test_the_arpa_loads_in_kenlm_and_each_context_sums_to_one(tmp_path, order):
    probs, backoff = kneser_ney(random_sentences(), order)
    counts = write_arpa(probs, backoff, tmp_path / "lm.arpa")
    assert counts == [len(probs[0]) + 1, *map(len, probs[1:])]  # + <s>
    assert len(counts) == order
    vocabulary = [*WORDS, EOS, "UNSEEN"]  # every unknown word is <unk>
    scorer = Scorer(tmp_path / "lm.arpa", vocabulary)
    contexts = {gram[:-1] for grams in probs for gram in grams if EOS not in gram[:-1]}
    assert {len(context) for context in contexts} == set(range(order))
    for context in contexts | {("UNSEEN",), (BOS, "UNSEEN"), ("UNSEEN", "CAT")}:
        total = sum(10 ** scorer.log10(context, word) for word in vocabulary)
        assert total == pytest.approx(1.0, abs=1e-5), context


def test_kneser_ney_counts_the_contexts_a_word_continues(tmp_path):
    # FRANCISCO is as frequent as CAT but only ever follows SAN: as the continuation of another word it is unlikely.
    sentences = [["SAN", "FRANCISCO"]] * 10 + [[w, "CAT"] for w in ("A", "THE", "MY", "YOUR", "HIS")] * 2
    write_arpa(*kneser_ney(sentences, 2), tmp_path / "lm.arpa")
    scorer = Scorer(tmp_path / "lm.arpa", ["CAT", "FRANCISCO", "SAN"])
    assert scorer.log10((), "FRANCISCO") < scorer.log10((), "CAT") - 0.5
    assert scorer.log10(("SAN",), "FRANCISCO") > -0.1


def test_a_model_needs_order_two_and_sentences():
    with pytest.raises(ValueError, match="order 2 and more"):
        kneser_ney([["A"]], 1)
    with pytest.raises(ValueError, match="no sentences"):
        kneser_ney([], 3)


def test_the_command_builds_the_lm_and_lexicon_of_the_training_transcripts(demo_root, tmp_path, capsys):
    overrides = ["experiment=demo", f"data.root={demo_root}", "data/source=folder", f"lm.dir={tmp_path}"]
    main(overrides)
    printed = capsys.readouterr().out
    transcripts = [
        normalize(line.split(" ", 1)[1])
        for path in (demo_root / "LibriSpeech" / "train").rglob("*.trans.txt")
        for line in path.read_text().splitlines()
    ]
    words = {w for t in transcripts for w in t.split()}
    header = (tmp_path / "3gram.arpa").read_text().split("\n\n")[0].splitlines()[1:]
    counts = ", ".join(f"{n}-grams {line.split('=')[1]}" for n, line in enumerate(header, 1))
    assert f"{tmp_path / '3gram.arpa'}: order 3 of {len(transcripts)} sentences (train): {counts}\n" in printed
    assert f"{tmp_path / 'lexicon.txt'}: {len(words)} words" in printed
    lexicon = dict(line.split(" ", 1) for line in (tmp_path / "lexicon.txt").read_text().splitlines())
    assert set(lexicon) == words and all(spelling == " ".join(w) + " |" for w, spelling in lexicon.items())
    scorer, sentence = Scorer(tmp_path / "3gram.arpa", sorted(words)), transcripts[0].split()
    assert scorer.sentence(sentence) > scorer.sentence(sentence[::-1]) and len(set(sentence)) > 1

    main([*overrides, "lm.unit=char", "lm.order=5"])
    assert len((tmp_path / "5gram-char.arpa").read_text().split("\n\n")[0].splitlines()) == 1 + 5
    scorer = Scorer(tmp_path / "5gram-char.arpa", ["|", "E", sentence[0]])
    unknown = scorer.log10((), sentence[0])
    assert scorer.log10((), "|") > unknown and scorer.log10((), "E") > unknown
