"""Batches out of DataLoader workers through shared slots: the same batches as without workers, and slots that
are freed, reused, and never handed to two batches at once."""

import types
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

import asr.data.transfer as transfer
from asr.data.dataset import decode_batch
from asr.data.librispeech import DataError
from asr.data.transfer import SharedSlots, SlotRef
from tests.test_archive import big_archive
from tests.test_datamodule import Recorder, make_datamodule, ready


@pytest.fixture
def in_worker(monkeypatch):
    monkeypatch.setattr(transfer, "get_worker_info", lambda: types.SimpleNamespace(id=1))


def batch_of(pcm):
    return {"input_values": pcm, "ids": ["a"]}


def test_a_batch_goes_through_a_slot_and_frees_it(in_worker):
    slots = SharedSlots(workers=2, per_worker=2, samples=12)
    slots.begin_iteration()
    pcm = slots.buffer([3, 5])
    assert pcm.shape == (2, 5) and pcm[0, 3:].eq(0).all()
    pcm[0, :3] = torch.tensor([1, 2, 3])
    pcm[1] = torch.arange(5)
    sent = slots.send(batch_of(pcm))
    ref = sent["input_values"]
    assert isinstance(ref, SlotRef) and (ref.worker, ref.rows, ref.columns) == (1, 2, 5) and sent["ids"] == ["a"]
    assert slots.marks[1, ref.slot] == ref.iteration == 1
    received = slots.receive(sent)["input_values"]
    assert received.tolist() == [[1, 2, 3, 0, 0], [0, 1, 2, 3, 4]]
    assert slots.marks.eq(0).all()
    slots.pcm.fill_(7)  # the received batch is a copy
    assert received.tolist() == [[1, 2, 3, 0, 0], [0, 1, 2, 3, 4]]


def test_a_batch_goes_the_usual_way_when_it_does_not_fit_or_no_slot_is_free(in_worker):
    slots = SharedSlots(workers=2, per_worker=2, samples=12)
    slots.begin_iteration()
    big = slots.buffer([13])
    assert not isinstance(slots.send(batch_of(big))["input_values"], SlotRef)
    held = [slots.send(batch_of(slots.buffer([4]))) for _ in range(2)]  # sent, not yet received
    assert {ref["input_values"].slot for ref in held} == {0, 1}
    extra = slots.buffer([4])
    assert extra.data_ptr() not in {slots.pcm[1, k].data_ptr() for k in range(2)}
    assert slots.send(batch_of(extra))["input_values"] is extra
    slots.receive(held[0])
    assert isinstance(slots.send(batch_of(slots.buffer([4])))["input_values"], SlotRef)


def test_a_batch_that_lost_utterances_is_sent_as_its_copy_and_frees_the_slot(in_worker):
    slots = SharedSlots(workers=2, per_worker=1, samples=12)
    slots.begin_iteration()
    pcm = slots.buffer([3, 4])
    copy = pcm[[1], :4]  # what Checks.batch keeps when the first utterance fails to decode
    assert slots.send(batch_of(copy))["input_values"] is copy
    assert slots.marks.eq(0).all()


def test_a_batch_that_fails_to_decode_frees_its_slot(in_worker):
    class Failing:
        def batch(self, records, on_error, skipped, buffer):
            buffer([4])
            raise DataError("x.flac: undecodable audio")

    slots = SharedSlots(workers=2, per_worker=1, samples=12)
    slots.begin_iteration()
    with pytest.raises(DataError, match="x.flac"):
        decode_batch(Failing(), [], "raise", slots)
    assert slots.marks.eq(0).all()


def test_an_earlier_iterations_unread_batch_is_freed_but_not_one_being_written(in_worker):
    slots = SharedSlots(workers=2, per_worker=2, samples=12)
    slots.begin_iteration()
    abandoned = slots.send(batch_of(slots.buffer([4])))  # complete, never read: DataLoader drops it
    slots.buffer([4])  # still being written by a worker of the abandoned iteration
    slots.begin_iteration()
    assert slots.marks[1].tolist() == [1, -1]
    reused = slots.buffer([4])
    assert reused.data_ptr() == slots.pcm[1, abandoned["input_values"].slot].data_ptr()
    slots.buffer([4])  # the other slot is still being written: this batch goes the usual way
    assert slots.marks[1].tolist() == [-2, -1]
    with pytest.raises(RuntimeError, match="overwritten in shared memory"):
        slots.receive(abandoned)


def drain(dm, loader):
    dm.load_state_dict({"epoch": 0, "batches": 0})
    return [(batch["ids"], batch["input_values"].clone()) for batch in (dm.on_after_batch_transfer(b, 0)
                                                                        for b in loader)]


@pytest.mark.parametrize("source", ["folder", "archive"])
def test_workers_send_through_slots_the_batches_they_would_send_the_usual_way(tmp_path, tokenizer, source,
                                                                               monkeypatch):
    built, _ = big_archive(tmp_path)
    root = tmp_path
    if source == "archive":
        root = tmp_path / "archives"
        root.mkdir()
        Path(built).rename(root / "train-clean-100.tar.gz")
    dm = ready(make_datamodule(root, tokenizer, train_splits=["train-clean-100"], val_splits=["train-clean-100"],
                               test_splits=[], max_batch_seconds=1.5, eval_batch_size=3, min_samples=100, seed=5,
                               num_workers=2))
    refs = []
    receive = SharedSlots.receive
    monkeypatch.setattr(SharedSlots, "receive", lambda self, batch, pin=False: (
        refs.append(isinstance(batch["input_values"], SlotRef)), receive(self, batch, pin))[1])
    for make in (dm.train_dataloader, lambda: dm.val_dataloader()[0]):
        usual = make()
        usual.dataset.slots = None
        expected = drain(dm, usual)
        assert len(expected) > 6
        loader = make()
        assert loader.dataset.slots is not None
        for abandoned in (False, True):
            if abandoned:  # left after a batch, as Lightning's sanity check leaves validation, and begun again at once
                dm.load_state_dict({"epoch": 0, "batches": 0})
                next(iter(loader))
            refs.clear()
            got = drain(dm, loader)
            assert [ids for ids, _ in got] == [ids for ids, _ in expected]
            assert all(torch.equal(pcm, usual_pcm) for (_, pcm), (_, usual_pcm) in zip(got, expected, strict=True))
            assert np.all(loader.dataset.slots.marks.numpy() >= 0)
            # At once after an abandoned iteration, its workers may still hold slots (see SharedSlots).
            assert sum(refs) > len(refs) / 2 if not abandoned else any(refs)

def test_lightning_gets_the_same_batches_through_slots_as_without_workers(tmp_path, tokenizer, monkeypatch):
    """Two epochs with validation, after Lightning's sanity check has left a validation iteration unfinished."""
    big_archive(tmp_path)

    def seen(workers):
        dm = make_datamodule(tmp_path, tokenizer, train_splits=["train-clean-100"], val_splits=["train-clean-100"],
                             test_splits=[], max_batch_seconds=1.5, eval_batch_size=3, min_samples=100, seed=5,
                             num_workers=workers)
        model = Recorder()
        L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                  default_root_dir=tmp_path).fit(model, datamodule=dm)
        return model.seen, model.validated

    alone = seen(0)
    assert len(alone[0]) > 20 and len(alone[1]) > 10
    refs = []
    receive = SharedSlots.receive
    monkeypatch.setattr(SharedSlots, "receive", lambda self, batch, pin=False: (
        refs.append(isinstance(batch["input_values"], SlotRef)), receive(self, batch, pin))[1])
    assert seen(2) == alone
    assert len(refs) == sum(map(len, alone)) and sum(refs) > 0.9 * len(refs)


def test_without_room_in_shared_memory_batches_go_the_usual_way(tmp_path, tokenizer, monkeypatch, caplog):
    import asr.data.datamodule as datamodule

    big_archive(tmp_path)
    dm = ready(make_datamodule(tmp_path, tokenizer, train_splits=["train-clean-100"], val_splits=[], test_splits=[],
                               max_batch_seconds=1.5, min_samples=100, num_workers=2))
    assert dm.train_dataloader().dataset.slots.pcm.numel() == 2 * 3 * 24_000
    monkeypatch.setattr(datamodule, "shared_memory_free", lambda: 200_000)
    loader = dm.train_dataloader()
    assert loader.dataset.slots is None
    assert "(0.3 MB) would take over half of the 0.2 MB free in /dev/shm" in caplog.text
    assert len(drain(dm, loader)) == len(loader)
