"""N-gram language models for beam search (``decoder.lm``): an interpolated Kneser-Ney ARPA writer, and
``python -m asr.lm [overrides]``, which builds one of the configured data's training transcripts.

``lm.unit=word`` (default) writes ``<lm.dir>/<order>gram.arpa`` and the lexicon of the transcripts' words,
``lexicon.txt``, for ``decoder=beam_lm``; ``lm.unit=char`` writes ``<order>gram-char.arpa``, a model over the
tokens (letters and ``|`` between words) for lexicon-free decoding. ``lm.dir`` defaults to ``<data.root>/lm``.
"""

from __future__ import annotations

import math
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from asr.builders import build_datamodule
from asr.config import compose
from asr.data.text import WORD_DELIMITER, normalize
from asr.decoding import write_lexicon

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
Gram = tuple[str, ...]


def count_ngrams(sentences: Iterable[Sequence[str]], order: int) -> list[Counter[Gram]]:
    """Counts of the 1- to ``order``-grams of the sentences, each between ``<s>`` and ``</s>``."""
    counts: list[Counter[Gram]] = [Counter() for _ in range(order)]
    for sentence in sentences:
        padded = (BOS, *sentence, EOS)
        for n in range(1, order + 1):
            counts[n - 1].update(padded[i : i + n] for i in range(len(padded) - n + 1))
    del counts[0][(BOS,)]  # <s> is a context, never predicted
    return counts


def _kneser_ney_counts(counts: list[Counter[Gram]]) -> list[Counter[Gram]]:
    """The highest order's counts as they are; below it, the number of distinct words seen before an n-gram
    (how many contexts it continues), except for n-grams that start the sentence, which have none."""
    adjusted = [Counter() for _ in counts]
    adjusted[-1] = counts[-1]
    for n in range(len(counts) - 1, 0, -1):
        for gram in counts[n]:
            adjusted[n - 1][gram[1:]] += 1
        adjusted[n - 1].update({gram: c for gram, c in counts[n - 1].items() if gram[0] == BOS})
    return adjusted


def _discount(counts: Counter[Gram]) -> float:
    """Ney's absolute discount n1 / (n1 + 2 n2), or 0.5 where the counts of counts do not give one in (0, 1)."""
    n1 = sum(1 for c in counts.values() if c == 1)
    n2 = sum(1 for c in counts.values() if c == 2)
    discount = n1 / (n1 + 2 * n2) if n1 else 0.0
    return discount if 0 < discount < 1 else 0.5


def kneser_ney(sentences: Iterable[Sequence[str]], order: int = 3) -> tuple[list[dict[Gram, float]], dict[Gram, float]]:
    """Interpolated Kneser-Ney: the probability of each seen n-gram, by order, and the backoff weight of each
    context. The unigrams are interpolated with the uniform distribution over the words, ``</s>`` and ``<unk>``.

    In an interpolated model the weight given to the lower order in a context is exactly the backoff weight that
    ARPA applies to the words not seen there, so the model is written as it is, normalised."""
    if order < 2:
        raise ValueError(f"lm.order={order}: KenLM loads models of order 2 and more")
    adjusted = _kneser_ney_counts(count_ngrams(sentences, order))
    if not adjusted[0]:
        raise ValueError("no sentences to build a language model of")
    probs: list[dict[Gram, float]] = []
    backoff: dict[Gram, float] = {}
    for n, counts in enumerate(adjusted, 1):
        discount = _discount(counts)
        totals: dict[Gram, int] = defaultdict(int)
        types: dict[Gram, int] = defaultdict(int)
        for gram, c in counts.items():
            totals[gram[:-1]] += c
            types[gram[:-1]] += 1
        weights = {context: discount * types[context] / totals[context] for context in totals}
        if n == 1:
            uniform = weights[()] / (len(counts) + 1)  # + <unk>
            probs.append({gram: max(c - discount, 0) / totals[()] + uniform for gram, c in counts.items()})
            probs[0][(UNK,)] = uniform
        else:
            lower = probs[-1]
            probs.append(
                {
                    gram: max(c - discount, 0) / totals[gram[:-1]] + weights[gram[:-1]] * lower[gram[1:]]
                    for gram, c in counts.items()
                }
            )
            backoff.update(weights)
    return probs, backoff


def write_arpa(probs: list[dict[Gram, float]], backoff: dict[Gram, float], path: str | Path) -> list[int]:
    """Write the model in the ARPA format (log10) beside ``path`` and move it there once complete; returns the
    number of n-grams of each order, as its header gives them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    orders = [{(BOS,): 0.0, **probs[0]}, *probs[1:]]
    with partial.open("w") as f:
        f.write("\\data\\\n" + "".join(f"ngram {n}={len(grams)}\n" for n, grams in enumerate(orders, 1)))
        for n, grams in enumerate(orders, 1):
            f.write(f"\n\\{n}-grams:\n")
            for gram, p in sorted(grams.items()):
                line = f"{math.log10(p):.6f}" if p > 0 else "-99"  # <s>: never predicted
                line += "\t" + " ".join(gram)
                if gram in backoff:
                    line += f"\t{math.log10(backoff[gram]):.6f}"
                f.write(line + "\n")
        f.write("\n\\end\\\n")
    partial.rename(path)
    return [len(grams) for grams in orders]


def _sentences(cfg) -> list[list[str]]:
    """The normalised transcripts of the training splits, as words."""
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    return [
        normalize(u.transcript).split()
        for split in datamodule.train_splits
        for u in datamodule.catalog.load(split, True)
    ]


def main(argv: list[str] | None = None) -> None:
    cfg = compose("lm", sys.argv[1:] if argv is None else argv)
    order, unit = int(cfg.lm.order), cfg.lm.unit
    if unit not in ("word", "char"):
        raise SystemExit(f"lm.unit={unit}: word or char")
    out = Path(cfg.lm.dir or Path(cfg.data.root) / "lm").expanduser()
    sentences = [words for words in _sentences(cfg) if words]
    if unit == "char":
        sentences = [list(WORD_DELIMITER.join(words)) for words in sentences]
    try:
        probs, backoff = kneser_ney(sentences, order)
    except ValueError as err:
        raise SystemExit(str(err)) from err
    arpa = out / f"{order}gram{'-char' if unit == 'char' else ''}.arpa"
    counts = ", ".join(f"{n}-grams {count}" for n, count in enumerate(write_arpa(probs, backoff, arpa), 1))
    print(f"{arpa}: order {order} of {len(sentences)} sentences ({', '.join(cfg.data.train_splits)}): {counts}")
    if unit == "word":
        lexicon = out / "lexicon.txt"
        words = write_lexicon((word for words in sentences for word in words), lexicon)
        print(f"{lexicon}: {words} words")


if __name__ == "__main__":
    main()
