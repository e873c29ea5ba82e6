"""What the notebooks (``notebooks/``) show, computed: a corpus's durations, speakers and vocabulary; a run's logged
curves and its WER per split; an evaluation's worst utterances, word confusions and WER by duration."""

from __future__ import annotations

import bisect
import csv
import json
import re
import struct
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from asr.scoring import Confusions, Counts, align

if TYPE_CHECKING:
    from asr.data.librispeech import Utterance

# Files that mark a run folder: a training run's logs or metrics, an evaluation's predictions.
RUN_MARKERS = {
    "train": ("csv/version_*/metrics.csv", "wandb/*run-*/run-*.wandb", "metrics.json"),
    "evaluate": ("predictions.jsonl",),
}
HOW_TO_MAKE = {
    "train": "train one (python -m asr.train experiment=demo)",
    "evaluate": "evaluate a checkpoint (python -m asr.evaluate ckpt_path=outputs/<date>/<time>/checkpoints/final.ckpt)",
}

Curve = tuple[list[int], list[float]]  # steps, values


def newest_run(kind: Literal["train", "evaluate"], outputs: str = "outputs") -> Path:
    """The newest ``kind`` run under the nearest ``outputs`` folder at or above the working
    directory (a notebook's working directory is usually ``notebooks/``, next to the project's ``outputs/``)."""
    cwd = Path.cwd()
    root = next((folder / outputs for folder in (cwd, *cwd.parents) if (folder / outputs).is_dir()), None)
    found = [] if root is None else [p for marker in RUN_MARKERS[kind] for p in root.glob(f"**/{marker}")]
    if not found:
        where = f"under {root}" if root is not None else f"no {outputs}/ folder at or above {cwd}"
        raise FileNotFoundError(f"No {kind} run found ({where}): {HOW_TO_MAKE[kind]}, or set RUN to its folder.")
    newest = max(found, key=lambda p: p.stat().st_mtime)
    return newest.parents[2] if newest.suffix in (".csv", ".wandb") else newest.parent


# A corpus


def corpus(
    overrides: Sequence[str] = ("experiment=demo",), splits: Sequence[str] | None = None
) -> dict[str, list[Utterance]]:
    """The usable utterances of each split (the config's train, validation and test splits unless given) of the
    corpus ``python -m asr.train <overrides>`` reads, read as it reads them: training splits with its training
    checks (durations, CTC lengths), the others whole."""
    # Here, not at the top: the runs' notebooks need none of the training stack (seconds to import).
    from asr.builders import build_datamodule
    from asr.config import compose

    cfg = compose("train", list(overrides))
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup()
    train = list(cfg.data.train_splits)
    wanted = splits or dict.fromkeys([*train, *cfg.data.val_splits, *cfg.data.test_splits])
    return {split: datamodule.catalog.load(split, split in train) for split in wanted}


def corpus_summary(splits: dict[str, list[Utterance]]) -> list[dict]:
    """Per split: utterances, hours, speakers, shortest, mean and longest durations (s), words, distinct words."""
    rows = []
    for split, utterances in splits.items():
        seconds = [u.duration for u in utterances]
        words = word_counts(utterances)
        rows.append(
            {
                "split": split,
                "utterances": len(utterances),
                "hours": round(sum(seconds) / 3600, 2),
                "speakers": len(speaker_counts(utterances)),
                "shortest": round(min(seconds), 2),
                "mean": round(sum(seconds) / len(seconds), 2),
                "longest": round(max(seconds), 2),
                "words": sum(words.values()),
                "distinct words": len(words),
            }
        )
    return rows


def durations(utterances: Iterable[Utterance]) -> list[float]:
    return [u.duration for u in utterances]


def speaker_counts(utterances: Iterable[Utterance]) -> Counter:
    """Utterances per speaker."""
    return Counter(u.speaker for u in utterances)


def word_counts(utterances: Iterable[Utterance]) -> Counter:
    return Counter(word for u in utterances for word in u.transcript.split())


def char_counts(utterances: Iterable[Utterance]) -> Counter:
    """Characters of the transcripts, spaces left out."""
    return Counter(char for u in utterances for char in u.transcript if not char.isspace())


# A training run


def history(run: str | Path) -> dict[str, Curve]:
    """Every metric a training run logged, as (steps, values): from its CSV logs (``csv/version_*/metrics.csv``),
    else from its W&B run log (``wandb/*run-*/run-*.wandb``, the newest); ``run`` may also be a ``.wandb`` file."""
    run = Path(run)
    if run.suffix == ".wandb":
        return wandb_history(run)
    tables = sorted(run.glob("csv/version_*/metrics.csv"), key=lambda p: int(p.parent.name.removeprefix("version_")))
    if tables:
        return csv_history(tables)
    logs = sorted(run.glob("wandb/*run-*/run-*.wandb"), key=lambda p: p.stat().st_mtime)
    if logs:
        return wandb_history(logs[-1])
    raise FileNotFoundError(f"{run}: no CSV logs (csv/version_*/metrics.csv) and no W&B run log (wandb/*/*.wandb)")


def csv_history(tables: Sequence[Path]) -> dict[str, Curve]:
    """The metrics of Lightning CSVLogger tables (one per version of a run, in order)."""
    curves: dict[str, Curve] = {}
    for table in tables:
        with open(table, newline="") as file:
            for row in csv.DictReader(file):
                for key, value in row.items():
                    if key not in ("epoch", "step") and value not in ("", None):
                        steps, values = curves.setdefault(key, ([], []))
                        steps.append(int(row["step"]))
                        values.append(float(value))
    return curves


# The W&B transaction log (``run-<id>.wandb``, online and offline runs alike): a LevelDB log
# (https://github.com/google/leveldb/blob/main/doc/log_format.md) of serialised ``wandb_internal.Record`` messages,
# after a 7-byte header; each chunk's checksum is a CRC-32 of its type byte and data. wandb (0.31 here) writes it
# and reads it back only in its Go core, through no Python API.
WANDB_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
NOT_METRICS = {"_step", "_runtime", "_timestamp", "trainer/global_step", "epoch"}


def wandb_records(path: Path) -> Iterator[bytes]:
    """The records of a W&B run log, in order; a partly written last record (a run still going) is left out."""
    data = Path(path).read_bytes()
    if not data.startswith(WANDB_HEADER):
        raise ValueError(f"{path}: not a W&B run log of a known version (it starts with {data[:7]!r})")
    pos, parts = len(WANDB_HEADER), b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's zero trailer
            pos += BLOCK - pos % BLOCK
            continue
        checksum, length, kind = struct.unpack_from("<IHB", data, pos)
        chunk = data[pos + 7 : pos + 7 + length]
        if len(chunk) < length:
            return
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != checksum:
            raise ValueError(f"{path}: corrupt W&B run log (checksum mismatch at byte {pos})")
        pos += 7 + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            parts = chunk
        elif kind == MIDDLE:
            parts += chunk
        elif kind == LAST:
            yield parts + chunk


def wandb_history(path: Path) -> dict[str, Curve]:
    """The numeric metrics of a W&B run log, by Lightning's step (``trainer/global_step``, else W&B's ``_step``)."""
    from wandb.proto.wandb_internal_pb2 import Record

    curves: dict[str, Curve] = {}
    for data in wandb_records(path):
        record = Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") != "history":
            continue
        row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        step = int(row.get("trainer/global_step", row.get("_step", 0)))
        for key, value in row.items():
            if key not in NOT_METRICS and isinstance(value, int | float) and not isinstance(value, bool):
                steps, values = curves.setdefault(key, ([], []))
                steps.append(step)
                values.append(float(value))
    return curves


def curves_of(curves: dict[str, Curve], name: str) -> dict[str, Curve]:
    """The training and validation curves of a metric ``name`` ("loss", "wer", "lr", ...): ``train/<name>``,
    ``val/<name>``, ``val/<split>/<name>``. Test metrics are one value each, for :func:`split_metrics`."""
    return {
        key: curve for key, curve in sorted(curves.items()) if key.endswith(f"/{name}") and not key.startswith("test/")
    }


def split_metrics(metrics: dict) -> list[dict]:
    """``<stage>/<split>/<name>`` values of a metrics file (``metrics.json``) as rows: stage, split, WER, CER, loss."""
    rows: dict[tuple[str, str], dict] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[2] in ("wer", "cer", "loss"):
            stage, split, name = parts
            rows.setdefault((stage, split), dict(stage=stage, split=split, wer=None, cer=None, loss=None))[name] = value
    return [rows[key] for key in sorted(rows)]


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path}: not JSON ({error})") from None


# An evaluation


@dataclass(frozen=True)
class Prediction:
    """One line of an evaluation's ``predictions.jsonl``."""

    split: str
    id: str
    reference: str
    hypothesis: str
    words: int  # of the reference
    substitutions: int
    deletions: int
    insertions: int
    seconds: float  # audio

    @property
    def counts(self) -> Counts:
        return Counts(self.words, self.substitutions, self.deletions, self.insertions)


TYPES = {"str": str, "int": int, "float": float}
FIELDS = {f.name: TYPES[f.type] for f in fields(Prediction)}


def read_predictions(run: str | Path) -> list[Prediction]:
    """The predictions of an evaluate run folder (its ``predictions.jsonl``), or of that file."""
    path = Path(run) / "predictions.jsonl" if Path(run).is_dir() else Path(run)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: python -m asr.evaluate writes it in its run folder")
    predictions = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            missing = FIELDS.keys() - item.keys()
            if missing:
                raise ValueError(f"missing {', '.join(sorted(missing))}")
            predictions.append(Prediction(**{name: kind(item[name]) for name, kind in FIELDS.items()}))
        except (ValueError, TypeError, AttributeError) as error:
            raise ValueError(f"{path}, line {number}: not a prediction ({error})") from None
    return predictions


def error_summary(predictions: Iterable[Prediction]) -> list[dict]:
    """Per split: utterances, reference words, substitutions, deletions, insertions and WER (errors over reference
    words, over all the split's utterances)."""
    splits: dict[str, list[Prediction]] = {}
    for p in predictions:
        splits.setdefault(p.split, []).append(p)
    return [{"split": split, **_totals(group)} for split, group in sorted(splits.items())]


def _totals(predictions: list[Prediction]) -> dict:
    counts = sum((p.counts for p in predictions), Counts())
    return {"utterances": len(predictions), **asdict(counts), "wer": counts.wer}


def worst(predictions: Iterable[Prediction], n: int = 10) -> list[dict]:
    """The ``n`` utterances of highest WER, the ones with more errors first among equals, as rows."""
    ranked = sorted(predictions, key=lambda p: (p.counts.wer, p.counts.errors), reverse=True)[:n]
    return [
        {
            "split": p.split,
            "id": p.id,
            "seconds": p.seconds,
            "words": p.words,
            "errors": p.counts.errors,
            "wer": p.counts.wer,
            "reference": p.reference,
            "hypothesis": p.hypothesis,
        }
        for p in ranked
    ]


def confusions(predictions: Iterable[Prediction], n: int = 20) -> dict[str, list[dict]]:
    """The ``n`` most frequent substitutions (reference word -> hypothesis word), deleted and inserted words."""
    counted = Confusions()
    for p in predictions:
        counted.add(align(p.reference, p.hypothesis))
    return counted.top(n)


def wer_by_duration(predictions: Sequence[Prediction], buckets: int = 5) -> list[dict]:
    """WER (and the :func:`error_summary` counts) of ``buckets`` duration ranges holding about as many utterances
    each; ``from`` and ``to`` are their bounds in seconds."""
    if not predictions:
        return []
    seconds = sorted(p.seconds for p in predictions)
    edges = sorted({seconds[len(seconds) * k // buckets] for k in range(buckets)})
    groups: list[list[Prediction]] = [[] for _ in edges]
    for p in predictions:
        groups[bisect.bisect_right(edges, p.seconds) - 1].append(p)
    bounds = [*edges[1:], seconds[-1]]
    return [
        {"from": start, "to": end, **_totals(group)} for start, end, group in zip(edges, bounds, groups, strict=True)
    ]


def markdown_table(rows: Sequence[dict], digits: int = 3) -> str:
    """Rows (dicts with the same keys) as a Markdown table; floats rounded to ``digits``."""
    if not rows:
        return "(none)"

    def cell(value) -> str:
        text = f"{value:.{digits}f}".rstrip("0").rstrip(".") if isinstance(value, float) else str(value)
        return re.sub(r"([|\\`*_<>\[\]])", r"\\\1", text)

    header = list(rows[0])
    lines = [header, ["---"] * len(header), *([cell(row[key]) for key in header] for row in rows)]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)
