"""Map-style batches from a random-access source, through DataLoader workers; the model's inputs."""

import torch

from asr.data.checks import Checks
from asr.data.dataset import SpeechDataset, model_inputs
from asr.data.librispeech import scan_directory
from asr.data.loaders import SpeechLoader
from asr.data.sources.folder import FolderSource
from asr.data.transfer import pcm_buffer
from tests.helpers import write_corpus


def test_model_inputs_normalise_each_utterance_over_its_own_samples():
    pcm = [torch.randint(-3000, 3000, (n,), dtype=torch.int16) + offset for n, offset in ((900, 500), (400, -20))]
    buffer = pcm_buffer([900, 400])
    for k, row in enumerate(pcm):
        buffer[k, : len(row)] = row
    inputs = model_inputs({"input_values": buffer, "lengths": [900, 400], "labels": [[5, 6], [7]]})
    assert inputs["attention_mask"].sum(1).tolist() == inputs["lengths"].tolist() == [900, 400]
    assert inputs["labels"].tolist() == [[5, 6], [7, -100]] and inputs["label_lengths"].tolist() == [2, 1]
    for k, row in enumerate(pcm):
        audio = row.double() / 32768
        expected = (audio - audio.mean()) / torch.sqrt(audio.var(unbiased=False) + 1e-7)
        torch.testing.assert_close(inputs["input_values"][k, : len(row)].double(), expected, atol=1e-5, rtol=1e-5)
    assert not inputs["input_values"][1, 400:].any()


def test_batches_from_a_worker_equal_batches_made_in_process(tmp_path, tokenizer):
    """A worker reuses its buffers from batch to batch: padding must still be zero after a batch of longer audio."""
    utterances, _ = scan_directory(write_corpus(tmp_path))
    by_id = {u.id: u for u in utterances}
    order = [["84-121123-0001", "174-50561-0000"], ["84-121123-0000", "174-50561-0006"]]
    utterances = [by_id[i] for batch in order for i in batch]
    dataset = SpeechDataset(FolderSource(str(tmp_path)), utterances, Checks(tokenizer))
    sampler = [[0, 1], [2, 3]]
    assert max(u.num_samples for u in dataset.utterances[2:]) < max(u.num_samples for u in dataset.utterances[:2])
    in_process = [dataset.batch(indices) for indices in sampler]
    loader = SpeechLoader(dataset, batch_sampler=sampler, num_workers=1)
    for made, sent in zip(in_process, loader, strict=True):
        assert sent["ids"] == made["ids"] and sent["lengths"] == made["lengths"]
        torch.testing.assert_close(sent["input_values"], made["input_values"], rtol=0, atol=0)
        for k, n in enumerate(sent["lengths"]):
            assert not sent["input_values"][k, n:].any()
