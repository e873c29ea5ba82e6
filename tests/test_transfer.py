"""Batches out of DataLoader workers through shared slots: the same batches as without workers, and slots that
are freed, reused, and never handed to two batches at once."""

import pickle
import types
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

import asr.data.loaders as loaders
import asr.data.transfer as transfer
from asr.data.checks import Checks
from asr.data.dataset import SpeechDataset, decode_batch
from asr.data.librispeech import DataError
from asr.data.loaders import SpeechLoader
from asr.data.sources.archive import ArchiveSource
from asr.data.sources.folder import FolderSource
from asr.data.stream import StreamDataset
from asr.data.transfer import SharedSlots, SlotRef, Tasks
from tests.helpers import Recorder, big_archive, make_datamodule, ready, write_flac


@pytest.fixture
def in_worker(monkeypatch):
    monkeypatch.setattr(transfer, "get_worker_info", lambda: types.SimpleNamespace(id=1))


def batch_of(pcm):
    return {"input_values": pcm, "ids": ["a"]}


def test_a_batch_goes_through_a_slot_and_frees_it(in_worker):
    slots = SharedSlots(workers=2, per_worker=2, samples=12)
    pcm = slots.buffer([3, 5], 1)
    assert pcm.shape == (2, 5) and pcm[0, 3:].eq(0).all()
    pcm[0, :3] = torch.tensor([1, 2, 3])
    pcm[1] = torch.arange(5)
    sent = slots.send(batch_of(pcm))
    ref = sent["input_values"]
    assert isinstance(ref, SlotRef) and (ref.worker, ref.rows, ref.columns) == (1, 2, 5) and sent["ids"] == ["a"]
    assert slots.marks[1, ref.slot] == 1 and ref.write == 1
    received = slots.receive(sent)["input_values"]
    assert received.tolist() == [[1, 2, 3, 0, 0], [0, 1, 2, 3, 4]]
    assert slots.marks.eq(0).all()
    slots.pcm.fill_(7)  # the received batch is a copy
    assert received.tolist() == [[1, 2, 3, 0, 0], [0, 1, 2, 3, 4]]


def test_a_batch_goes_the_usual_way_when_it_does_not_fit_or_no_slot_is_free(in_worker):
    slots = SharedSlots(workers=2, per_worker=2, samples=12)
    big = slots.buffer([13], 1)
    assert not isinstance(slots.send(batch_of(big))["input_values"], SlotRef)
    held = [slots.send(batch_of(slots.buffer([4], 1))) for _ in range(2)]  # sent, not yet received
    assert {ref["input_values"].slot for ref in held} == {0, 1}
    extra = slots.buffer([4], 1)
    assert extra.data_ptr() not in {slots.pcm[1, k].data_ptr() for k in range(2)}
    assert slots.send(batch_of(extra))["input_values"] is extra
    slots.receive(held[0])
    assert isinstance(slots.send(batch_of(slots.buffer([4], 1)))["input_values"], SlotRef)


def test_a_batch_that_lost_utterances_is_sent_as_its_copy_and_frees_the_slot(in_worker):
    slots = SharedSlots(workers=2, per_worker=1, samples=12)
    pcm = slots.buffer([3, 4], 1)
    copy = pcm[[1], :4]  # what Checks.batch keeps when the first utterance fails to decode
    assert slots.send(batch_of(copy))["input_values"] is copy
    assert slots.marks.eq(0).all()


def test_a_batch_that_fails_to_decode_frees_its_slot(in_worker):
    class Failing:
        def batch(self, records, on_error, skipped, buffer):
            buffer([4])
            raise DataError("x.flac: undecodable audio")

    slots = SharedSlots(workers=2, per_worker=1, samples=12)
    with pytest.raises(DataError, match="x.flac"):
        decode_batch(Failing(), [], "raise", slots, 1)
    assert slots.marks.eq(0).all()


def test_an_earlier_iterations_unread_batch_is_freed_but_not_one_being_written(in_worker):
    slots = SharedSlots(workers=2, per_worker=3, samples=12)
    abandoned = slots.send(batch_of(slots.buffer([4], 1)))  # complete, never read: DataLoader drops it
    slots.buffer([4], 1)  # still being written by a worker of the abandoned iteration
    assert slots.marks[1].tolist() == [1, -1, 0]
    reused = [slots.buffer([4], 2), slots.buffer([4], 2)]
    assert {pcm.data_ptr() for pcm in reused} == {slots.pcm[1, k].data_ptr() for k in (0, 2)}
    assert slots.marks[1].tolist() == [-2, -1, -2]
    slots.buffer([4], 2)  # the slot still being written is not taken: this batch goes the usual way
    assert slots.marks[1].tolist() == [-2, -1, -2]
    with pytest.raises(RuntimeError, match="overwritten in shared memory"):
        slots.receive(abandoned)


def test_a_batch_is_not_read_from_a_slot_rewritten_since_even_by_its_own_iteration(in_worker):
    """Two live iterations at once: a later one's batch takes the slot, is read, and a worker of the first
    writes the slot again; the first batch is then gone, though the slot's mark is its iteration's again."""
    slots = SharedSlots(workers=2, per_worker=1, samples=12)
    first = slots.send(batch_of(slots.buffer([4], 1)))
    slots.receive(slots.send(batch_of(slots.buffer([4], 2))))
    slots.send(batch_of(slots.buffer([4], 1)))
    assert slots.marks[1, 0] == 1
    with pytest.raises(RuntimeError, match="overwritten in shared memory"):
        slots.receive(first)


def test_a_lock_left_held_by_a_killed_process_is_an_error_not_a_hang(in_worker, monkeypatch):
    slots = SharedSlots(workers=2, per_worker=1, samples=12)
    sent = slots.send(batch_of(slots.buffer([4], 1)))
    monkeypatch.setattr(transfer, "LOCK_WAIT", 0.1)
    slots.lock.acquire()  # as by a worker killed inside a critical section
    with pytest.raises(RuntimeError, match="was not released in 0.1 s"):
        slots.receive(sent)


def test_tasks_group_batches_and_are_tagged_with_the_iteration_they_are_drawn_in():
    slots = SharedSlots(workers=1, per_worker=1, samples=4)
    tasks = Tasks([[0, 1], [2], [3, 4], [5]], slots, group=3)
    slots.begin_iteration()
    first = iter(tasks)
    drawn = next(first)
    assert len(tasks) == 2 and drawn == [[0, 1], [2], [3, 4]] and drawn.iteration == 1
    slots.begin_iteration()
    assert next(first).iteration == 2  # tagged when drawn (DataLoader draws after the iteration began)
    tagged = list(tasks)
    assert tagged == [[[0, 1], [2], [3, 4]], [[5]]] and [t.iteration for t in tagged] == [2, 2]
    assert pickle.loads(pickle.dumps(tagged[1])).iteration == 2  # as a worker's index queue carries it
    assert list(Tasks([[0], [1]], None)) == [[[0]], [[1]]] and next(iter(Tasks([[0]], None))).iteration == 0
    with pytest.raises(ValueError, match="at least one batch"):
        Tasks([[0]], slots, group=0)


@pytest.fixture
def refs(monkeypatch):
    """For each batch the main process receives, whether it came through a slot."""
    through_slot = []
    receive = SharedSlots.receive

    def recorded(self, batch, pin=False):
        through_slot.append(isinstance(batch["input_values"], SlotRef))
        return receive(self, batch, pin)

    monkeypatch.setattr(SharedSlots, "receive", recorded)
    return through_slot


def drain(dm, loader):
    dm.load_state_dict({"epoch": 0, "batches": 0})
    return [
        (batch["ids"], batch["input_values"].clone()) for batch in (dm.on_after_batch_transfer(b, 0) for b in loader)
    ]


@pytest.mark.parametrize(("source", "task_seconds"), [("folder", None), ("folder", 6.0), ("archive", 6.0)])
def test_workers_send_through_slots_the_batches_they_would_send_the_usual_way(
    tmp_path, tokenizer, source, task_seconds, monkeypatch, refs
):
    """With a batch per task, and with tasks of 4 batches (archive streams send batches one by one)."""
    built, _ = big_archive(tmp_path)
    root = tmp_path
    if source == "archive":
        root = tmp_path / "archives"
        root.mkdir()
        Path(built).rename(root / "train-clean-100.tar.gz")
    sources = {"folder": FolderSource, "archive": ArchiveSource}
    dm = ready(
        make_datamodule(
            root,
            tokenizer,
            sources[source](str(root)),
            train_splits=["train-clean-100"],
            val_splits=["train-clean-100"],
            test_splits=[],
            max_batch_seconds=1.5,
            eval_batch_size=3,
            min_samples=100,
            seed=5,
            num_workers=2,
            task_seconds=task_seconds,
        )
    )
    for make in (dm.train_dataloader, lambda: dm.val_dataloader()[0]):
        with monkeypatch.context() as without_slots:
            without_slots.setattr(dm.transport, "slots", lambda *args: None)
            usual = make()
        expected = drain(dm, usual)
        assert len(expected) > 6
        loader = make()
        assert usual.slots is None and loader.slots is not None
        for abandoned in (False, True):
            if abandoned:  # left after a batch, as Lightning's sanity check leaves validation, and begun again at once
                dm.load_state_dict({"epoch": 0, "batches": 0})
                next(iter(loader))
            refs.clear()
            got = drain(dm, loader)
            assert [ids for ids, _ in got] == [ids for ids, _ in expected]
            assert all(torch.equal(pcm, usual_pcm) for (_, pcm), (_, usual_pcm) in zip(got, expected, strict=True))
            assert np.all(loader.slots.marks.numpy() >= 0)
            assert all(refs)  # no slot left held by an abandoned iteration


def test_tasks_of_several_batches_yield_the_batches_of_one_per_task_and_resume_mid_epoch(tmp_path, tokenizer):
    big_archive(tmp_path)
    options = dict(
        train_splits=["train-clean-100"],
        val_splits=["train-clean-100"],
        test_splits=[],
        max_batch_seconds=1.5,
        eval_batch_size=3,
        min_samples=100,
        seed=5,
    )
    alone = ready(make_datamodule(tmp_path, tokenizer, num_workers=0, task_seconds=4.5, **options))
    grouped = ready(make_datamodule(tmp_path, tokenizer, num_workers=2, task_seconds=4.5, **options))
    assert alone.train_dataloader().batch_sampler.group == 1  # no workers: nothing to spread
    loader = grouped.train_dataloader()
    assert loader.batch_sampler.group == 3 and len(loader) == len(alone.train_dataloader()) > 20
    expected = [ids for ids, _ in drain(alone, alone.train_dataloader())]
    assert [ids for ids, _ in drain(grouped, loader)] == expected
    grouped.load_state_dict({"epoch": 0, "batches": 7})  # a run resumed after 7 batches, mid-task
    assert [b["ids"] for b in loader] == expected[7:]
    val = grouped.val_dataloader()[0]
    assert val.batch_sampler.group > 1
    assert [b["ids"] for b in val] == [b["ids"] for b in alone.val_dataloader()[0]]
    grouped.transport.task_seconds = None
    assert grouped.train_dataloader().batch_sampler.group == 1
    with pytest.raises(ValueError, match="data.task_seconds must be positive"):
        make_datamodule(tmp_path, tokenizer, task_seconds=0, **options)


@pytest.mark.parametrize("task_seconds", [None, 4.5])
def test_lightning_gets_the_same_batches_through_slots_as_without_workers(tmp_path, tokenizer, refs, task_seconds):
    """Two epochs with validation, after Lightning's sanity check has left a validation iteration unfinished; with
    a batch per task, and with tasks of 3."""
    big_archive(tmp_path)

    def seen(workers):
        dm = make_datamodule(
            tmp_path,
            tokenizer,
            train_splits=["train-clean-100"],
            val_splits=["train-clean-100"],
            test_splits=[],
            max_batch_seconds=1.5,
            eval_batch_size=3,
            min_samples=100,
            seed=5,
            num_workers=workers,
            task_seconds=task_seconds,
        )
        model = Recorder()
        L.Trainer(
            max_epochs=2,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            use_distributed_sampler=False,
            default_root_dir=tmp_path,
        ).fit(model, datamodule=dm)
        return model.seen, model.validated

    alone = seen(0)
    assert len(alone[0]) > 20 and len(alone[1]) > 10 and not refs
    assert seen(2) == alone
    assert len(refs) == sum(map(len, alone)) and all(refs)


def test_a_training_stream_without_a_manifest_has_slots_as_large_as_max_duration_allows(
    tmp_path, tokenizer, monkeypatch, refs
):
    root = tmp_path / "archives"
    root.mkdir()
    Path(big_archive(tmp_path)[0]).rename(root / "train-clean-100.tar.gz")
    options = dict(
        train_splits=["train-clean-100"],
        val_splits=[],
        test_splits=[],
        batch_size=3,
        max_batch_seconds=None,
        batches_per_epoch=6,
        min_samples=100,
        num_workers=2,
    )
    source = ArchiveSource(str(root))
    assert ready(make_datamodule(root, tokenizer, source, **options)).train_dataloader().slots is None
    dm = ready(make_datamodule(root, tokenizer, source, max_duration=1.5, **options))
    loader = dm.train_dataloader()
    assert loader.slots.samples == 3 * 24_000
    by_budget = {**options, "batch_size": None, "max_batch_seconds": 1.5, "max_duration": 5.0}
    assert ready(make_datamodule(root, tokenizer, source, **by_budget)).train_dataloader().slots.samples == 24_000
    evaluated = {**options, "val_splits": ["train-clean-100"], "eval_batch_size": 3}  # no manifest: no bound
    assert (
        ready(make_datamodule(root, tokenizer, source, max_duration=1.5, **evaluated)).val_dataloader()[0].slots is None
    )
    with monkeypatch.context() as without_slots:
        without_slots.setattr(dm.transport, "slots", lambda *args: None)
        expected = drain(dm, dm.train_dataloader())
    got = drain(dm, loader)
    assert len(got) == 6 and all(refs) and len(refs) == 6
    assert [ids for ids, _ in got] == [ids for ids, _ in expected]
    assert all(torch.equal(pcm, usual) for (_, pcm), (_, usual) in zip(got, expected, strict=True))


def test_resampled_batches_at_the_budget_fit_their_slots(tmp_path, tokenizer, refs):
    # 11002 samples at 22.05 kHz are 7983.3 at 16 kHz, which resampling makes 7984: two of them are 15968 samples,
    # a batch of 2 * 11002 / 22050 s, which is 15966.6 samples.
    for k in range(4):
        write_flac(tmp_path / "LibriSpeech" / "train" / "1" / "2" / f"1-2-{k}.flac", 11002 / 22050, rate=22050)
    (tmp_path / "LibriSpeech" / "train" / "1" / "2" / "1-2.trans.txt").write_text(
        "".join(f"1-2-{k} HELLO\n" for k in range(4))
    )
    dm = ready(
        make_datamodule(
            tmp_path,
            tokenizer,
            val_splits=[],
            test_splits=[],
            resample=True,
            max_batch_seconds=2 * 11002 / 22050,
            num_workers=2,
        )
    )
    batches = drain(dm, dm.train_dataloader())
    assert [pcm.shape for _, pcm in batches] == [(2, 7984)] * 2
    assert refs == [True, True]


def test_a_loader_refuses_slots_it_could_not_tag_with_their_iteration(tmp_path, tokenizer):
    slots = SharedSlots(workers=2, per_worker=1, samples=4)
    with pytest.raises(ValueError, match="need each batch's loader iteration"):
        SpeechLoader(
            SpeechDataset(FolderSource(str(tmp_path)), [], Checks(tokenizer), slots=slots),
            batch_size=None,
            num_workers=2,
        )
    stream = StreamDataset([], Checks(tokenizer), batch_size=2, slots=slots)
    with pytest.raises(ValueError, match="need each batch's loader iteration"):
        SpeechLoader(stream, batch_size=None, num_workers=2, persistent_workers=True)
    assert SpeechLoader(stream, batch_size=None, num_workers=2).slots is slots


def test_without_room_in_shared_memory_batches_go_the_usual_way(tmp_path, tokenizer, monkeypatch, caplog):
    big_archive(tmp_path)
    dm = ready(
        make_datamodule(
            tmp_path,
            tokenizer,
            train_splits=["train-clean-100"],
            val_splits=[],
            test_splits=[],
            max_batch_seconds=1.5,
            min_samples=100,
            num_workers=2,
            task_seconds=3,
        )
    )
    loader = dm.train_dataloader()
    assert loader.batch_sampler.group == 2
    assert loader.slots.pcm.numel() == 2 * 3 * 2 * 24_000  # workers, tasks, batches per task
    monkeypatch.setattr(loaders, "shared_memory_free", lambda: 700_000)  # room for tasks of 1 batch, not 2
    loader = dm.train_dataloader()
    assert loader.batch_sampler.group == 1 and loader.slots.pcm.numel() == 2 * 3 * 24_000 and not caplog.text
    monkeypatch.setattr(loaders, "shared_memory_free", lambda: 400_000)
    loader = dm.train_dataloader()
    assert loader.slots is None
    assert "(0.3 MB) would take over half of the 0.4 MB free in /dev/shm" in caplog.text
    assert len(drain(dm, loader)) == len(loader)
