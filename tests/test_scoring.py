"""Word alignment and error counts (asr.scoring) against jiwer and torchmetrics, and by hand."""

import random

import jiwer
import pytest
from torchmetrics.functional.text import word_error_rate

from asr.scoring import Confusions, Counts, align, score_predictions


def random_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Sentence pairs with many equally short alignments (few distinct words), and edits of a reference, as a
    recogniser makes them; some references or hypotheses are empty."""
    rng = random.Random(seed)
    pairs = []
    for k in range(n):
        vocabulary = ["A", "B", "C", "THE", "CAT", "SAT", "ON", "MAT"][: rng.choice((2, 4, 8))]
        ref = [rng.choice(vocabulary) for _ in range(rng.randint(0, 15))]
        if k % 2:
            hyp = [rng.choice(vocabulary) for _ in range(rng.randint(0, 15))]
        else:
            hyp = []
            for word in ref:
                edit = rng.random()
                hyp += [] if edit < 0.1 else [rng.choice(vocabulary)] if edit < 0.25 else [word]
                hyp += [rng.choice(vocabulary)] if rng.random() < 0.1 else []
        pairs.append((" ".join(ref), " ".join(hyp)))
    return pairs


PAIRS = random_pairs(600)


def test_counts_are_jiwers_on_random_pairs():
    assert sum(not ref for ref, _ in PAIRS) > 10 and sum(not hyp for _, hyp in PAIRS) > 10
    total = Counts()
    for ref, hyp in PAIRS:
        counts = Counts.of(align(ref, hyp))
        expected = jiwer.process_words(ref, hyp)
        got = (counts.substitutions, counts.deletions, counts.insertions, counts.hits)
        assert got == (expected.substitutions, expected.deletions, expected.insertions, expected.hits), (ref, hyp)
        assert counts.wer == pytest.approx(expected.wer, abs=0), (ref, hyp)
        total += counts
    refs, hyps = zip(*PAIRS, strict=True)
    overall = jiwer.process_words(list(refs), list(hyps))
    assert (total.substitutions, total.deletions, total.insertions) == (
        overall.substitutions,
        overall.deletions,
        overall.insertions,
    )
    assert total.wer == overall.wer


def test_the_wer_is_the_one_torchmetrics_logs():
    """The model logs torchmetrics' WER: the edit distance summed over the pairs, over the reference words."""
    with_words = [(ref, hyp) for ref, hyp in PAIRS if ref]
    for ref, hyp in with_words:
        counts = Counts.of(align(ref, hyp))
        assert counts.errors == round(float(word_error_rate(hyp, ref)) * counts.words), (ref, hyp)
    refs, hyps = zip(*with_words, strict=True)
    total = sum((Counts.of(align(ref, hyp)) for ref, hyp in with_words), Counts())
    assert total.wer == pytest.approx(float(word_error_rate(list(hyps), list(refs))), rel=1e-6)


@pytest.mark.parametrize(
    ("ref", "hyp", "pairs"),
    [
        ("", "", []),
        ("", "A B", [(None, "A"), (None, "B")]),
        ("A B", "", [("A", None), ("B", None)]),
        ("THE CAT SAT", "THE CAT SAT", [("THE", "THE"), ("CAT", "CAT"), ("SAT", "SAT")]),
        ("THE CAT SAT", "A CAT SAT ON", [("THE", "A"), ("CAT", "CAT"), ("SAT", "SAT"), (None, "ON")]),
        ("THE CAT SAT", " THE  SAT ", [("THE", "THE"), ("CAT", None), ("SAT", "SAT")]),
        # Equally short alignments (2 substitutions, or a deletion, a hit and an insertion): jiwer's choice.
        ("A B", "B C", [("A", "B"), ("B", "C")]),
        ("A B C", "B C D", [("A", None), ("B", "B"), ("C", "C"), (None, "D")]),
    ],
)
def test_hand_made_alignments(ref, hyp, pairs):
    assert align(ref, hyp) == pairs


def test_counts_of_edge_cases():
    assert Counts.of(align("", "")) == Counts() and Counts().wer == 0.0
    empty_ref = Counts.of(align("", "A B"))
    assert (empty_ref.words, empty_ref.insertions, empty_ref.wer) == (0, 2, 2.0)
    empty_hyp = Counts.of(align("A B C", ""))
    assert (empty_hyp.words, empty_hyp.deletions, empty_hyp.hits, empty_hyp.wer) == (3, 3, 0, 1.0)
    mixed = Counts.of(align("THE CAT SAT ON THE MAT", "A CAT SAT THE MAT AT ALL"))
    assert (mixed.words, mixed.substitutions, mixed.deletions, mixed.insertions, mixed.hits) == (6, 1, 1, 2, 4)
    assert mixed.errors == 4 and mixed.wer == 4 / 6
    assert mixed + empty_hyp == Counts(9, 1, 4, 2)


def test_confusions_are_counted_and_ranked():
    confusions = Confusions()
    for ref, hyp in [("THE CAT", "A CAT"), ("THE MAT", "A MAT"), ("ON THE MAT", "ON MAT"), ("CAT", "BAT CAT")]:
        confusions.add(align(ref, hyp))
    confusions.add([("SAT", "SET"), ("MAT", "MAP")])
    top = confusions.top(2)
    assert top["substitutions"] == [
        {"reference": "THE", "hypothesis": "A", "count": 2},
        {"reference": "MAT", "hypothesis": "MAP", "count": 1},  # ties alphabetically
    ]
    assert top["deletions"] == [{"word": "THE", "count": 1}]
    assert top["insertions"] == [{"word": "BAT", "count": 1}]


def test_score_predictions_counts_each_utterance_and_each_split():
    rows = [
        {"split": "dev", "reference": "THE CAT SAT", "hypothesis": "A CAT SAT"},
        {"split": "dev", "reference": "ON THE MAT", "hypothesis": "ON A MAT TOO"},
        {"split": "test", "reference": "THE CAT", "hypothesis": ""},
    ]
    scores = score_predictions(rows, ["dev", "test"], top=5)
    assert [(r["words"], r["substitutions"], r["deletions"], r["insertions"]) for r in rows] == [
        (3, 1, 0, 0),
        (3, 1, 0, 1),
        (2, 0, 2, 0),
    ]
    assert scores["dev"]["counts"] == Counts(6, 2, 0, 1)
    assert scores["test"]["counts"] == Counts(2, 0, 2, 0)
    assert scores["all"]["counts"] == Counts(8, 2, 2, 1)
    assert scores["dev"]["confusions"]["substitutions"] == [{"reference": "THE", "hypothesis": "A", "count": 2}]
    assert scores["all"]["confusions"]["deletions"] == [{"word": "CAT", "count": 1}, {"word": "THE", "count": 1}]
