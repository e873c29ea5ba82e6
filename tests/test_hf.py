"""LibriSpeech from a Hugging Face dataset folder laid out as openslr/librispeech_asr (config ``all``, Parquet)."""

import dataclasses
import io
import pickle

import numpy as np
import pytest
import soundfile as sf

from asr.data.checks import Checks
from asr.data.dataset import SpeechDataset
from asr.data.librispeech import DataError
from asr.data.manifest import load_manifest
from asr.data.sources import hf
from asr.data.sources.hf import HfSource
from tests.helpers import make_datamodule, ready

datasets = pytest.importorskip("datasets")

README = """---
configs:
- config_name: all
  data_files:
  - split: validation.clean
    path: all/validation.clean-*
  - split: test.clean
    path: all/test.clean-*
---
"""


def flac(samples: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, 16_000, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def write_split(folder, split, rows):
    # Audio as its storage struct, then cast: encoding audio values would need torchcodec.
    features = datasets.Features(
        {
            "file": datasets.Value("string"),
            "audio": {"bytes": datasets.Value("binary"), "path": datasets.Value("string")},
            "text": datasets.Value("string"),
            "speaker_id": datasets.Value("int64"),
            "chapter_id": datasets.Value("int64"),
            "id": datasets.Value("string"),
        }
    )
    columns = {key: [row[key] for row in rows] for key in features}
    table = datasets.Dataset.from_dict(columns, features=features).cast_column("audio", datasets.Audio(16_000))
    (folder / "all").mkdir(parents=True, exist_ok=True)
    table.to_parquet(folder / "all" / f"{split}-00000-of-00001.parquet")


def row(utt_id, text, audio_bytes):
    speaker, chapter, _ = utt_id.split("-")
    return {
        "file": f"{utt_id}.flac",
        "audio": {"bytes": audio_bytes, "path": f"{utt_id}.flac"},
        "text": text,
        "speaker_id": int(speaker),
        "chapter_id": int(chapter),
        "id": utt_id,
    }


@pytest.fixture
def hf_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    hf.open_split.cache_clear()
    rng = np.random.default_rng(0)
    audio = {f"84-121-{k:04d}": rng.integers(-3000, 3000, 16_000 + 1000 * k).astype(np.int16) for k in range(5)}
    folder = tmp_path / "librispeech_asr"
    folder.mkdir()
    (folder / "README.md").write_text(README)
    write_split(
        folder,
        "validation.clean",
        [
            *(row(utt_id, f"WORD {'ABCDE'[k]}", flac(a)) for k, (utt_id, a) in enumerate(audio.items())),
            row("84-121-0090", "BROKEN", b"not a flac file"),
            row("84-121-0091", "", flac(audio["84-121-0000"])),
            row("84-121-0092", None, flac(audio["84-121-0000"])),
            {**row("84-121-0093", "NO AUDIO", None), "audio": {"bytes": None, "path": None}},
        ],
    )
    write_split(folder, "test.clean", [row("61-70-0000", "HELLO WORLD", flac(audio["84-121-0001"]))])
    yield folder, audio
    hf.open_split.cache_clear()


def test_split_names_map_to_the_all_config():
    assert hf.location("openslr/librispeech_asr", "dev-other") == "hf://openslr/librispeech_asr#validation.other"
    assert hf.location("/data/ls", "dev-clean") == "hf:///data/ls#validation.clean"
    assert hf.location("/data/ls", "train-clean-100") == "hf:///data/ls#train.clean.100"
    assert hf.location("/data/ls", "train-clean-360") == "hf:///data/ls#train.clean.360"
    assert hf.location("/data/ls", "train-other-500") == "hf:///data/ls#train.other.500"
    assert hf.location("/data/ls", "test-clean") == "hf:///data/ls#test.clean"
    assert hf.location("/data/ls", "test-other") == "hf:///data/ls#test.other"


def test_only_the_asked_split_is_prepared(hf_folder, tmp_path):
    folder, _ = hf_folder
    assert len(hf.open_split(hf.location(str(folder), "test-clean"))) == 1
    prepared = sorted(p.name for p in (tmp_path / "hf-cache").rglob("*.arrow"))
    assert prepared == ["librispeech_asr-test.clean.arrow"]
    with pytest.raises(DataError, match=r"no split 'test\.other'.*\['test\.clean', 'validation\.clean'\]"):
        hf.open_split(hf.location(str(folder), "test-other"))


@pytest.mark.parametrize("workers", [0, 1])
def test_batches_problems_and_exact_audio_from_a_hugging_face_folder(hf_folder, tokenizer, tmp_path, workers):
    folder, audio = hf_folder
    dm = ready(
        make_datamodule(
            tmp_path / "unused",
            tokenizer,
            HfSource(str(folder)),
            train_splits=["dev-clean"],
            val_splits=["dev-clean"],
            test_splits=["test-clean"],
            num_workers=workers,
            max_batch_seconds=100,
            manifest_dir=str(tmp_path / "manifests"),
        )
    )
    location = f"hf://{folder}#validation.clean"
    assert dm.source.locations("dev-clean") == [location]
    utterances = dm.catalog.load("dev-clean", False)
    assert {u.id: u.transcript for u in utterances} == {
        "84-121-0000": "WORD A",
        "84-121-0001": "WORD B",
        "84-121-0002": "WORD C",
        "84-121-0003": "WORD D",
        "84-121-0004": "WORD E",
    }
    assert {u.id: u.num_samples for u in utterances} == {k: len(a) for k, a in audio.items()}
    assert {u.speaker for u in utterances} == {"84"}
    assert dm.skipped == {"dev-clean/unreadable audio": 2, "dev-clean/empty transcript": 2}
    (manifest,) = dm.catalog.manifest("dev-clean")
    assert sorted(p.where for p in manifest.problems) == [f"{location}:84-121-009{k}" for k in range(4)]
    assert "no audio bytes in the row" in next(p.detail for p in manifest.problems if p.where.endswith("0093"))

    (batch,) = list(dm.train_dataloader())
    assert sorted(batch["ids"]) == sorted(audio)
    for k, utt_id in enumerate(batch["ids"]):
        np.testing.assert_array_equal(batch["input_values"][k, : batch["lengths"][k]].numpy(), audio[utt_id])
    dm.setup("test")
    (test_batch,) = list(dm.test_dataloader()[0])
    assert test_batch["texts"] == ["HELLO WORLD"]


def test_a_bad_row_names_the_split_and_the_utterance_under_raise(hf_folder, tokenizer, tmp_path):
    folder, _ = hf_folder
    dm = make_datamodule(
        tmp_path,
        tokenizer,
        HfSource(str(folder)),
        train_splits=["dev-clean"],
        val_splits=["dev-clean"],
        test_splits=["test-clean"],
        on_error="raise",
        manifest_dir=str(tmp_path / "manifests"),
    )
    dm.prepare_data()
    with pytest.raises(DataError, match=r"validation\.clean:84-121-009[0-3]"):
        dm.setup("fit")


def test_a_missing_folder_is_named_before_the_run_and_hub_ids_are_left_to_datasets(tmp_path):
    splits = ["train-clean-100", "dev-clean"]
    assert HfSource(str(tmp_path / "nowhere")).missing(splits) == (
        f"data.source.dataset={tmp_path / 'nowhere'} is not a folder (a local copy of openslr/librispeech_asr, or "
        "its hub id)."
    )
    (tmp_path / "librispeech_asr").mkdir()
    assert HfSource(str(tmp_path / "librispeech_asr")).missing(splits) is None
    assert HfSource("openslr/librispeech_asr").missing(splits) is None


def test_workers_get_the_opened_split_without_its_audio_or_loading_it_again(hf_folder, tokenizer, monkeypatch):
    folder, audio = hf_folder
    location = hf.location(str(folder), "dev-clean")
    utterances, _ = hf.scan(location)
    blob = pickle.dumps(SpeechDataset(HfSource(str(folder)), utterances, Checks(tokenizer)))  # as a worker gets it
    assert flac(audio["84-121-0003"]) not in blob  # the memory-mapped table goes by file name
    with monkeypatch.context() as patch:
        patch.setattr(hf, "open_split", lambda location: pytest.fail(f"opened {location} again"))
        batch = pickle.loads(blob).batch([0, 3])
    for k, utt_id in enumerate(batch["ids"]):
        np.testing.assert_array_equal(batch["input_values"][k, : batch["lengths"][k]].numpy(), audio[utt_id])


def test_a_rewritten_split_is_scanned_again(hf_folder, tmp_path):
    folder, audio = hf_folder
    location = hf.location(str(folder), "test-clean")
    manifest_path = tmp_path / "manifests" / "test-clean.json"
    source = HfSource(str(folder))
    assert [u.transcript for u in load_manifest(source, location, manifest_path).utterances] == ["HELLO WORLD"]
    write_split(folder, "test.clean", [row("61-70-0000", "GOODBYE WORLD", flac(audio["84-121-0001"]))])
    hf.open_split.cache_clear()  # a new process
    assert [u.transcript for u in load_manifest(source, location, manifest_path, verify=True).utterances] == [
        "GOODBYE WORLD"
    ]


def test_a_manifest_row_that_holds_another_utterance_is_an_error(hf_folder, tokenizer):
    folder, _ = hf_folder
    utterances, _ = hf.scan(hf.location(str(folder), "dev-clean"))
    stale = dataclasses.replace(utterances[1], index=utterances[2].index)  # as a hand-edited or stale manifest
    with pytest.raises(DataError, match=r"validation\.clean:84-121-0001: row 2 of the split is '84-121-0002'"):
        SpeechDataset(HfSource(str(folder)), [stale], Checks(tokenizer)).batch([0])
