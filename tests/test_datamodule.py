"""The DataModule: splits from each source to batches, skips counted once, resume; and the data commands."""

import subprocess
import sys
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch

import asr.data.stream as stream_module
from asr.data.librispeech import DataError
from asr.data.sources.archive import ArchiveSource
from asr.data.sources.folder import FolderSource
from asr.model import SpeechRecognizer
from tests.helpers import (
    CHECK_PROBLEMS,
    SOURCE_PROBLEMS,
    TINY_HUBERT,
    USABLE,
    FolderHandler,
    Recorder,
    big_archive,
    drain,
    make_archive,
    make_datamodule,
    ready,
    truncated_corpus,
    write_corpus,
    write_flac,
)


def test_batches_from_the_demo_corpus(demo_root, tokenizer, tmp_path):
    dm = ready(make_datamodule(demo_root, tokenizer, manifest_dir=str(tmp_path)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dev.json", "test-seen.json", "train.json"]
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert batch["input_values"].dtype == torch.float32
    assert batch["attention_mask"].sum() / 16000 <= 10
    lengths = batch["attention_mask"].sum(1)
    k = int(lengths.argmin())
    assert batch["input_values"][k, lengths[k] :].abs().sum() == 0
    assert tokenizer.decode(batch["labels"][0][: batch["label_lengths"][0]].tolist()) == batch["texts"][0]
    assert batch["skipped"] == []
    assert sum(len(b["ids"]) for b in dm.val_dataloader()[0]) == len(dm.catalog.load("dev", False))


def test_loader_options_reach_every_dataloader(demo_root, tokenizer, tmp_path):
    dm = ready(
        make_datamodule(
            demo_root, tokenizer, manifest_dir=str(tmp_path), num_workers=1, prefetch_factor=5, pin_memory=False
        ),
        stage=None,
    )
    loaders = [dm.train_dataloader(), *dm.val_dataloader(), *dm.test_dataloader()]
    assert [(d.num_workers, d.prefetch_factor, d.pin_memory) for d in loaders] == [(1, 5, False)] * 3
    alone = ready(make_datamodule(demo_root, tokenizer, manifest_dir=str(tmp_path), num_workers=0, prefetch_factor=5))
    assert alone.train_dataloader().prefetch_factor is None  # nothing to prefetch without workers
    assert (
        ready(make_datamodule(demo_root, tokenizer, manifest_dir=str(tmp_path))).train_dataloader().pin_memory
        == torch.cuda.is_available()
    )


def test_out_of_vocabulary_and_duration_filters_are_counted(tmp_path, tokenizer):
    chapter = tmp_path / "LibriSpeech" / "train" / "1" / "2"
    for k, seconds in enumerate([1.0, 1.0, 0.2, 1.0]):
        write_flac(chapter / f"1-2-{k}.flac", seconds)
    (chapter / "1-2.trans.txt").write_text("1-2-0 HELLO\n1-2-1 CAFÉ NOIR\n1-2-2 TOO SHORT\n1-2-3 FINE\n")
    dm = make_datamodule(tmp_path, tokenizer, min_duration=0.5)
    utterances, problems = dm.catalog.read("train", for_training=True)
    assert [u.id for u in utterances] == ["1-2-0", "1-2-3"]
    assert Counter(p.reason for p in problems) == {
        "characters outside the vocabulary": 1,
        "shorter than data.min_duration": 1,
    }
    strict = make_datamodule(tmp_path, tokenizer, on_error="raise")
    with pytest.raises(DataError, match=r"1-2-1\.flac: characters outside the vocabulary \(É\)"):
        strict.catalog.read("train", for_training=True)


def corpus_datamodule(source, tokenizer, **kwargs):
    splits = dict(train_splits=["dev-clean"], val_splits=["dev-clean"], test_splits=["dev-clean"])
    return make_datamodule(source.root, tokenizer, source, batch_size=2, max_batch_seconds=None, **{**splits, **kwargs})


def corpus_source(tmp_path, kind):
    """The mini corpus, as a folder or as an archive in a root of its own."""
    write_corpus(tmp_path)
    if kind == "folder":
        return FolderSource(str(tmp_path))
    (tmp_path / "archives").mkdir()
    make_archive(tmp_path, "dev-clean", tmp_path / "archives" / "dev-clean.tar.gz")
    return ArchiveSource(str(tmp_path / "archives"))


@pytest.mark.parametrize("source", ["folder", "archive", "url", "url without ranges"])
def test_every_bad_input_is_counted_by_reason(tmp_path, tokenizer, source, serve, monkeypatch):  # noqa: F811
    www, url = serve
    monkeypatch.setattr(FolderHandler, "ranges", source != "url without ranges")
    corpus = corpus_source(tmp_path, "folder" if source == "folder" else "archive")
    options = {}
    if source.startswith("url"):
        (Path(corpus.root) / "dev-clean.tar.gz").rename(www / "dev-clean.tar.gz")
        corpus = ArchiveSource(corpus.root, url)
        options = {"manifest_dir": str(tmp_path / "manifests")}
    dm = ready(corpus_datamodule(corpus, tokenizer, val_splits=[], test_splits=[], **options))
    assert dm.source.random_access == (source == "folder")
    assert bool(dm.catalog.index_files) == (source in ("archive", "url"))  # read by region
    batches = drain(dm, dm.train_dataloader())
    trained = sorted(i for b in batches for i in b["ids"])
    assert trained == sorted(set(USABLE) - {"174-50561-0002", "174-50561-0006"})
    dm.teardown("fit")
    # The problems in the manifest (of a folder, or of an archive read by region or streamed whole) are counted at
    # setup, and the truncated file when decoded.
    once = (
        "empty transcript",
        "transcript without audio",
        "unreadable audio",
        "wrong sample rate",
        "shorter than the receptive field",
        "characters outside the vocabulary",
        "label longer than the output frames",
        "undecodable audio",
    )
    expected = {f"dev-clean/{reason}": 1 for reason in once} | {"dev-clean/audio without transcript": 2}
    assert dm.skipped == expected


@pytest.mark.parametrize("source", ["folder", "archive"])
def test_evaluation_uses_every_usable_utterance_once(tmp_path, tokenizer, source):
    """Also when the split is trained on: training leaves out what has too few frames for its label, and
    evaluation keeps it."""
    dm = ready(corpus_datamodule(corpus_source(tmp_path, source), tokenizer, test_splits=[]))
    trained = {i for b in drain(dm, dm.train_dataloader()) for i in b["ids"]}
    assert trained == set(USABLE) - {"174-50561-0002", "174-50561-0006"}
    batches = drain(dm, dm.val_dataloader()[0])
    assert sorted(i for b in batches for i in b["ids"]) == sorted(set(USABLE) - {"174-50561-0002"})
    skipped = Counter(p.reason for b in batches for p in b["skipped"])
    assert skipped == {"undecodable audio": 1}  # the rest was counted at setup, from the manifest


def test_a_scanned_archive_is_evaluated_by_region_once_across_ranks_and_workers(tmp_path, tokenizer, monkeypatch):
    built, transcripts = big_archive(tmp_path)
    root = tmp_path / "archives"  # without the folder the archive was made from
    root.mkdir()
    archive = str(Path(built).rename(root / "train-clean-100.tar.gz"))
    dm = ready(
        make_datamodule(
            root,
            tokenizer,
            ArchiveSource(str(root)),
            train_splits=[],
            val_splits=["train-clean-100"],
            test_splits=[],
            num_workers=2,
            eval_batch_size=3,
        ),
        "validate",
    )
    assert set(dm.catalog.index_files) == {archive}
    monkeypatch.setattr(stream_module, "read_archive", lambda *args: pytest.fail("streamed whole"))
    ranks = []
    for rank in range(2):
        monkeypatch.setattr(dm, "_rank_and_world", lambda rank=rank: (rank, 2))
        ranks.append([i for b in drain(dm, dm.val_dataloader()[0]) for i in b["ids"]])
    assert all(len(ids) > 0.3 * len(transcripts) for ids in ranks)  # shared out by region
    assert sorted(ranks[0] + ranks[1]) == sorted(transcripts)


def test_batches_per_epoch_leaves_only_the_training_archive_unscanned(tmp_path, tokenizer):
    corpus = corpus_source(tmp_path, "archive")  # dev-clean.tar.gz
    root = Path(corpus.root)
    write_corpus(tmp_path, "dev-other")
    make_archive(tmp_path, "dev-other", root / "dev-other.tar.gz")
    dm = ready(corpus_datamodule(corpus, tokenizer, val_splits=["dev-other"], test_splits=[], batches_per_epoch=3))
    assert sorted(p.name for p in (root / "manifests").glob("*.json")) == ["dev-other.json"]
    assert len(drain(dm, dm.train_dataloader())) == 3
    batches = drain(dm, dm.val_dataloader()[0])
    assert sorted(i for b in batches for i in b["ids"]) == sorted(set(USABLE) - {"174-50561-0002"})


@pytest.mark.parametrize("source", ["folder", "archive"])
def test_each_unusable_utterance_is_counted_once_however_often_it_is_read(tmp_path, tokenizer, source):
    """Two epochs, each with a validation pass, over a split trained and evaluated on: an archive's evaluation
    stream meets its source problems again in every pass, and both read the truncated file every time."""
    dm = ready(corpus_datamodule(corpus_source(tmp_path, source), tokenizer, test_splits=[]))
    for _ in range(2):
        drain(dm, dm.train_dataloader())
        drain(dm, dm.val_dataloader()[0])
    dm.teardown("fit")
    reasons = Counter(
        [
            *SOURCE_PROBLEMS.values(),
            *CHECK_PROBLEMS.values(),
            "label longer than the output frames",
            "undecodable audio",
        ]
    )
    assert dm.skipped == {f"dev-clean/{reason}": n for reason, n in reasons.items()}


def test_a_skip_in_training_and_evaluation_counts_once_under_its_own_split(tmp_path, tokenizer):
    truncated_corpus(tmp_path, good=1, bad=1)  # dev-clean
    other = tmp_path / "LibriSpeech" / "dev-other" / "7" / "8"
    write_flac(other / "7-8-0.flac", 1.0)
    (other / "7-8.trans.txt").write_text("7-8-0 HELLO\n")
    dm = ready(
        corpus_datamodule(
            FolderSource(str(tmp_path)),
            tokenizer,
            train_splits=["dev-clean", "dev-other"],
            val_splits=["dev-clean"],
            test_splits=[],
        )
    )
    drain(dm, dm.train_dataloader())
    drain(dm, dm.val_dataloader()[0])
    assert dm.skipped == {"dev-clean/undecodable audio": 1}


def test_raise_policy_names_the_file_when_decoding(tmp_path, tokenizer):
    truncated_corpus(tmp_path, good=1, bad=1)
    dm = ready(corpus_datamodule(FolderSource(str(tmp_path)), tokenizer, on_error="raise"))
    with pytest.raises(DataError, match=r"5-6-1\.flac: undecodable audio \("):
        drain(dm, dm.train_dataloader())


def test_an_all_skipped_batch_is_empty_and_counted(tmp_path, tokenizer):
    truncated_corpus(tmp_path)
    dm = ready(corpus_datamodule(FolderSource(str(tmp_path)), tokenizer))
    (batch,) = drain(dm, dm.train_dataloader())
    assert batch["input_values"].shape == (0, 0) and batch["ids"] == [] and len(batch["skipped"]) == 2
    dm.teardown("fit")
    assert dm.skipped == {"dev-clean/undecodable audio": 2}
    model = SpeechRecognizer(tokenizer, torch.optim.SGD, config=TINY_HUBERT, freeze_feature_encoder=False)
    loss = model.training_step(batch, 0)  # a zero step, so that DDP ranks stay in step
    loss.backward()
    assert loss.item() == 0 and all(p.grad is not None and not p.grad.any() for p in model.parameters())
    model.validation_step(batch, 0)


@pytest.mark.parametrize("source", ["folder", "archive"])
def test_resume_through_the_datamodule_state_gives_the_remaining_batches(tmp_path, tokenizer, source):
    archive, _ = big_archive(tmp_path)
    root = tmp_path
    if source == "archive":
        root = tmp_path / "archives"
        root.mkdir()
        (tmp_path / "train-clean-100.tar.gz").rename(root / "train-clean-100.tar.gz")
    sources = {"folder": FolderSource, "archive": ArchiveSource}
    options = dict(
        train_splits=["train-clean-100"],
        val_splits=[],
        test_splits=[],
        max_batch_seconds=1.5,
        min_samples=100,
        shuffle_buffer=12,
        seed=5,
        num_workers=2,
    )
    first = ready(make_datamodule(root, tokenizer, sources[source](str(root)), **options))
    first.load_state_dict({"epoch": 1, "batches": 0})
    loader = first.train_dataloader()
    full = [b["ids"] for b in drain(first, loader)]
    assert len(full) == len(loader) > 6
    ids = [i for batch in full for i in batch]
    if source == "folder":  # (a stream shard that runs short after epoch 0 re-reads its start)
        assert len(ids) == len(set(ids))  # two workers, no duplicates
    first.load_state_dict({"epoch": 1, "batches": 0})
    head = []
    for batch in loader:
        head.append(first.on_after_batch_transfer(batch, 0)["ids"])
        if len(head) == 5:
            break
    state = first.state_dict()
    assert state == {"epoch": 1, "batches": 5}

    resumed = ready(make_datamodule(root, tokenizer, sources[source](str(root)), **options))
    resumed.load_state_dict(state)
    assert head + [b["ids"] for b in resumed.train_dataloader()] == full


def fit(root, tokenizer, tmp_path, ckpt_path=None, **trainer_options):
    dm = make_datamodule(
        root,
        tokenizer,
        train_splits=["train-clean-100"],
        val_splits=[],
        test_splits=[],
        max_batch_seconds=1.5,
        min_samples=100,
        seed=5,
    )
    model = Recorder()
    options = dict(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        use_distributed_sampler=False,
        default_root_dir=tmp_path,
    )
    L.Trainer(**{**options, **trainer_options}).fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model.seen


@pytest.mark.parametrize("into_second_epoch", [3, 0])
def test_lightning_reshuffles_each_epoch_and_resumes(tmp_path, tokenizer, into_second_epoch):
    big_archive(tmp_path)
    whole = fit(tmp_path, tokenizer, tmp_path)
    epochs = [[ids for e, ids, _ in whole if e == epoch] for epoch in (0, 1)]
    assert len(epochs[0]) == len(epochs[1]) > 6 and epochs[0] != epochs[1]
    steps = len(epochs[0]) + into_second_epoch  # stop there, with a checkpoint (0: at the end of epoch 0)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=steps)
    stopped = fit(tmp_path, tokenizer, tmp_path, max_steps=steps, enable_checkpointing=True, callbacks=[checkpoint])
    assert stopped == whole[:steps]
    (path,) = (tmp_path / "ckpt").glob(f"*step={steps}.ckpt")
    resumed = fit(tmp_path, tokenizer, tmp_path, ckpt_path=path)
    assert stopped + resumed == whole


def test_inspect_command(demo_root, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "asr.data",
            "inspect",
            "experiment=demo",
            f"data.root={demo_root}",
            "data/source=folder",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "train: " in result.stdout and "8 speakers" in result.stdout
    assert "test-unseen: 16 utterances" in result.stdout and "2 speakers" in result.stdout
    assert "skipped: 0" in result.stdout and "read: at random" in result.stdout
    assert f"0 unusable utterances listed in {tmp_path / 'skipped.tsv'}" in result.stdout


def test_inspect_an_archive_lists_its_skips(tmp_path):
    write_corpus(tmp_path / "src")
    make_archive(tmp_path / "src", "dev-clean", tmp_path / "dev-clean.tar.gz")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "asr.data",
            "inspect",
            f"data.root={tmp_path}",
            "data/source=archive",
            "data.train_splits=[dev-clean]",
            "data.val_splits=[]",
            "data.test_splits=[]",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert f"dev-clean: {len(USABLE) - 1} utterances" in result.stdout
    assert "dev-clean.tar.gz" in result.stdout and "read: in parts, through its gzip index" in result.stdout
    assert f"skipped: {5 + len(CHECK_PROBLEMS) + 1}\n" in result.stdout
    assert "    label longer than the output frames: 1\n      " in result.stdout
    assert "dev-clean.tar.gz:LibriSpeech/dev-clean/174/50561/174-50561-0006.flac (" in result.stdout
    assert f"listed in {tmp_path / 'skipped.tsv'}" in result.stdout


def test_an_evaluation_utterance_longer_than_the_budget_is_batched_alone(tmp_path, tokenizer, caplog):
    dm = ready(
        corpus_datamodule(
            corpus_source(tmp_path, "folder"),
            tokenizer,
            train_splits=[],
            test_splits=[],
            eval_batch_size=None,
            eval_max_batch_seconds=2.0,
        ),
        "validate",
    )
    assert "1 utterances longer than data.eval_max_batch_seconds=2.0 are batched alone" in caplog.text
    batches = [b["ids"] for b in dm.val_dataloader()[0]]
    assert ["84-121123-0001"] in batches  # 2.5 s
    assert sorted(i for b in batches for i in b) == sorted(set(USABLE) - {"174-50561-0002"})  # (undecodable)
