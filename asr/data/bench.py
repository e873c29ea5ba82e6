"""Data-loader benchmark: ``python -m asr.data.bench [--workers 0,2] [--seconds 20] [--json F] [key=value]``.

The ``key=value`` overrides are the training config's (default ``experiment=demo``). Reports:

- throughput: audio seconds per second delivered by the DataModule's train loader with N workers
  (``data.num_workers``), and by plain ``soundfile.read`` of the same split's files in one loop, timed next to
  it; ``per_worker`` is the loader's rate over N (or 1) times the plain rate; with N > 1, plain decoding in N
  processes at once is timed too (what the machine's free cores allow N decoders). The loader yields 16-bit PCM and
  lengths; the float, normalised model inputs are made after the transfer to the device (``model_inputs``),
  whose cost on the host CPU is reported next to it (for scale: plain decoding costs 1000 / its rate
  milliseconds per audio-second). CPU milliseconds per audio-second of the workers, the main process and plain
  decoding are reported too: on a machine with fewer free cores than workers, they show what each worker costs
  when its rate cannot. Measured on the configured train split, and on ``--long-files`` FLAC files of
  LibriSpeech-like durations (12.7 s on average, against the demo's 1.7 s) spliced from it, batched by
  ``--synthetic-batch-seconds``;
- with ``--archive-shards N``: the time one stream shard of N takes to read its members from a ``.tar.gz`` of the
  train split, streamed (every shard inflates the whole archive) against read by region through the gzip index
  of the manifest scan; with ``--archive-http`` too, the same from a server of byte ranges on 127.0.0.1;
- padding efficiency (real samples / padded samples) of this project's batches (the sampler, and the stream's
  buffer bucketing) against fixed-size random batches and transformers' ``LengthGroupedSampler`` with the same
  mean batch size, on the configured train split's durations and on a synthetic 100-hour LibriSpeech-like set.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import multiprocessing
import os
import random
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import soundfile as sf
import torch
from transformers.trainer_pt_utils import LengthGroupedSampler

from asr.builders import build_datamodule
from asr.config import compose
from asr.data.archive import cut_regions, read_archive, read_members
from asr.data.batching import DurationBatchSampler, bucket_stream, efficiency
from asr.data.dataset import model_inputs
from asr.data.librispeech import Problem, Utterance
from asr.data.manifest import load_manifest
from asr.data.rangeserver import serve
from asr.data.sources.archive import ArchiveSource
from asr.data.synthetic import librispeech_like_durations, write_long_files


def padding(durations: list[float], max_batch_seconds: float, buffer_size: int, seed: int = 0) -> dict:
    """Padding efficiency of each batching on the same durations."""
    ours = list(DurationBatchSampler(durations, max_batch_seconds=max_batch_seconds, seed=seed))
    stream = list(
        bucket_stream(
            range(len(durations)), durations.__getitem__, None, max_batch_seconds, buffer_size, random.Random(seed)
        )
    )
    size = max(1, round(len(durations) / len(ours)))
    shuffled = list(range(len(durations)))
    random.Random(seed).shuffle(shuffled)
    samples = [round(d * 16_000) for d in durations]
    grouped = list(LengthGroupedSampler(size, lengths=samples, generator=torch.Generator().manual_seed(seed)))
    return {
        "utterances": len(durations),
        "hours": round(sum(durations) / 3600, 2),
        "max_batch_seconds": max_batch_seconds,
        "mean_batch_size": size,
        "sampler": round(efficiency(ours, durations), 4),
        "stream_buffer": round(efficiency(stream, durations), 4),
        "random_fixed_size": round(
            efficiency([shuffled[i : i + size] for i in range(0, len(shuffled), size)], durations), 4
        ),
        "length_grouped": round(
            efficiency([grouped[i : i + size] for i in range(0, len(grouped), size)], durations), 4
        ),
    }


def plain_rate(paths: list[str], seconds: float, ready: Callable[[], object] = lambda: None) -> dict:
    """Audio seconds per second (``rate``) of ``soundfile.read`` over ``paths`` in one loop, as many times over
    as ``seconds`` takes, and its CPU milliseconds per audio-second (``cpu``). Timed after one untimed pass (at
    most ``seconds`` long), so that both this and the loader read from the page cache, and then ``ready()``."""
    start = time.perf_counter()
    for path in paths:
        sf.read(path, dtype="float32")
        if time.perf_counter() - start > seconds:
            break
    ready()
    audio, start, cpu = 0.0, time.perf_counter(), time.process_time()
    for path in itertools.cycle(paths):
        data, rate = sf.read(path, dtype="float32")
        audio += len(data) / rate
        if time.perf_counter() - start > seconds:
            break
    return {"rate": audio / (time.perf_counter() - start), "cpu": 1000 * (time.process_time() - cpu) / audio}


def _plain_process(paths: list[str], seconds: float, barrier, results) -> None:
    results.put(plain_rate(paths, seconds, barrier.wait)["rate"])


def parallel_plain_rate(paths: list[str], seconds: float, processes: int) -> float:
    """Audio seconds per second of :func:`plain_rate` in ``processes`` processes at once, each over its own share
    of ``paths`` (their timed loops start together): what this machine's free cores allow that many decoders,
    the ceiling of a loader with as many workers."""
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(processes, timeout=2 * seconds + 60), context.Queue()
    children = [
        context.Process(target=_plain_process, args=(paths[k::processes], seconds, barrier, results), daemon=True)
        for k in range(processes)
    ]
    try:
        for child in children:
            child.start()
        return sum(results.get(timeout=4 * seconds + 60) for _ in children)
    finally:
        for child in children:
            child.terminate()
            child.join()


def workers_cpu() -> float | None:
    """CPU seconds used so far by this process's live multiprocessing children (the DataLoader's workers), or
    None where there is no ``/proc``."""
    total = 0.0
    for child in multiprocessing.active_children():
        try:
            fields = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return total


def loader_rate(datamodule, workers: int, seconds: float) -> dict:
    """Audio seconds per second (``rate``) out of the train loader (16-bit PCM and lengths, what goes to the
    device), over as many passes as ``seconds`` takes, timed from its first batch (worker start-up left out); and
    the CPU milliseconds per audio-second of the main process (``cpu_main``) and of the workers (``cpu_workers``,
    None without workers or ``/proc``) over that time."""
    datamodule.transport.num_workers = workers
    loader = datamodule.train_dataloader()
    audio, start = 0.0, None
    while start is None or time.perf_counter() - start < seconds:
        batches = 0
        for batch in loader:
            batches += 1
            if start is None:
                start, main_cpu, worker_cpu = time.perf_counter(), time.process_time(), workers_cpu()
                continue
            audio += sum(batch["lengths"]) / 16_000
            if time.perf_counter() - start > seconds:
                break
        if batches == 0:
            raise ValueError(f"the train loader of {datamodule.train_splits} yields no batches")
    elapsed, main_cpu = time.perf_counter() - start, time.process_time() - main_cpu
    end = workers_cpu() if workers and worker_cpu is not None else None
    worker_cpu = None if end is None else end - worker_cpu
    del loader
    return {
        "rate": audio / elapsed,
        "cpu_main": 1000 * main_cpu / audio,
        "cpu_workers": None if worker_cpu is None else 1000 * worker_cpu / audio,
    }


def model_inputs_cost(datamodule, batches: int = 20) -> float:
    """Milliseconds per audio-second of :func:`model_inputs` on the host CPU (on a GPU it runs there), on the
    first ``batches`` batches of the train loader."""
    datamodule.transport.num_workers = 0
    loaded = list(itertools.islice(datamodule.train_dataloader(), batches))
    start = time.perf_counter()
    for batch in loaded:
        model_inputs(batch)
    return 1000 * (time.perf_counter() - start) / sum(sum(b["lengths"]) / 16_000 for b in loaded)


def _timed(records) -> dict:
    start, audio = time.perf_counter(), 0.0
    for record in records:
        if not isinstance(record, Problem):
            audio += record[0].duration
    elapsed = time.perf_counter() - start
    return {"seconds": round(elapsed, 2), "audio_s_per_s": round(audio / elapsed, 1)}


def archive_reading(folder: str, shards: int, tmp: Path, over_http: bool = False) -> dict:
    """Seconds for the middle stream shard of ``shards`` to get its members' bytes out of a ``.tar.gz`` of the split
    ``folder`` (gzip level 6, as OpenSLR's): streamed, and by region through the index of a manifest scan; with
    ``over_http``, also from a server of byte ranges on 127.0.0.1 (in a process of its own)."""
    archive = tmp / "split.tar.gz"
    start = time.perf_counter()
    with tarfile.open(archive, "w:gz", compresslevel=6) as tar:
        tar.add(folder, arcname=f"LibriSpeech/{Path(folder).name}")
    packed = time.perf_counter() - start
    shard = shards // 2

    source = ArchiveSource(str(tmp))

    def timings(location: str, name: str) -> dict:
        start = time.perf_counter()
        manifest = load_manifest(source, location, tmp / name)
        scanned = time.perf_counter() - start
        streamed = _timed(read_archive(location, shard, shards))
        by_region = _timed(read_members(location, manifest.index_file, cut_regions(manifest.utterances, shards)[shard]))
        return {
            "members": len(manifest.utterances),
            "scan_and_index_seconds": round(scanned, 1),
            "streamed": streamed,
            "by_region": by_region,
            "speedup": round(streamed["seconds"] / by_region["seconds"], 2),
        }

    result = {
        "archive_mb": round(archive.stat().st_size / 1e6, 1),
        "pack_seconds": round(packed, 1),
        "shards": shards,
        "shard": shard,
        **timings(str(archive), "manifest.json"),
    }
    if over_http:
        context = multiprocessing.get_context("fork")
        port = context.Queue()
        server = context.Process(target=serve, args=(str(tmp), port), daemon=True)
        server.start()
        try:
            url = f"http://127.0.0.1:{port.get(timeout=30)}/{archive.name}"
            result["over_http"] = timings(url, "manifest-http.json")
        finally:
            server.terminate()
            server.join()
    return result


def train_data(overrides: list[str]):
    datamodule = build_datamodule(compose("train", overrides))
    datamodule.prepare_data()
    datamodule.setup("fit")
    if not datamodule.source.random_access:
        raise SystemExit("the throughput benchmark reads audio files; choose a source read at random (data/source=...)")
    return datamodule, [u for split in datamodule.train_splits for u in datamodule.catalog.load(split, True)]


def throughput(datamodule, utterances: list[Utterance], workers: list[int], seconds: float, rounds: int) -> dict:
    """Loader and plain rates, alternated ``rounds`` times (the machine's speed drifts): medians, and the median
    of the per-round ratios. With N > 1 workers, plain decoding is also timed in N processes at once
    (``ratio_to_parallel_plain``): the loader's rate against what N decoders get from this machine's free
    cores. CPU time per audio-second depends far less than the rates on how many cores are free:
    ``worker_cpu_efficiency`` is plain decoding's over the workers' (1: a worker spends nothing beyond
    decoding)."""
    results = {
        "mean_duration": round(statistics.mean(u.duration for u in utterances), 2),
        "model_inputs_on_host_ms_per_audio_s": round(model_inputs_cost(datamodule), 4),
    }
    paths = [u.path for u in utterances]
    for n in workers:
        loaded, plain, parallel = [], [], []
        for _ in range(rounds):
            loaded.append(loader_rate(datamodule, n, seconds / rounds))
            plain.append(plain_rate(paths, seconds / rounds))
            if n > 1:
                parallel.append(parallel_plain_rate(paths, seconds / rounds, n))
        ratio = statistics.median(ours["rate"] / theirs["rate"] for ours, theirs in zip(loaded, plain, strict=True))
        cpu = {
            "plain": statistics.median(p["cpu"] for p in plain),
            "main": statistics.median(r["cpu_main"] for r in loaded),
        }
        if all(r["cpu_workers"] is not None for r in loaded):
            cpu["workers"] = statistics.median(r["cpu_workers"] for r in loaded)
        result = {
            "audio_s_per_s": round(statistics.median(r["rate"] for r in loaded), 1),
            "plain_audio_s_per_s": round(statistics.median(p["rate"] for p in plain), 1),
            "ratio": round(ratio, 3),
            "per_worker": round(ratio / max(1, n), 3),
            "cpu_ms_per_audio_s": {name: round(value, 4) for name, value in cpu.items()},
        }
        if "workers" in cpu:
            result["worker_cpu_efficiency"] = round(cpu["plain"] / cpu["workers"], 3)
        if parallel:
            result["parallel_plain_audio_s_per_s"] = round(statistics.median(parallel), 1)
            result["ratio_to_parallel_plain"] = round(
                statistics.median(ours["rate"] / theirs for ours, theirs in zip(loaded, parallel, strict=True)), 3
            )
        results[f"workers={n}"] = result
    return results


def run(
    overrides: list[str],
    workers: list[int],
    seconds: float,
    rounds: int,
    synthetic_hours: float,
    synthetic_batch_seconds: float,
    long_files: int,
    archive_shards: int = 0,
    archive_http: bool = False,
) -> dict:
    overrides = overrides or ["experiment=demo"]
    datamodule, utterances = train_data(overrides)
    loader = {"corpus": throughput(datamodule, utterances, workers, seconds, rounds)}
    if long_files:
        with tempfile.TemporaryDirectory() as tmp:
            root = write_long_files(utterances, Path(tmp), long_files)
            long_data, long_utterances = train_data(
                [
                    *(o for o in overrides if not o.startswith("data/source=")),
                    "data/source=folder",
                    f"data.root={root}",
                    "data.train_splits=[train-clean-100]",
                    "data.val_splits=[]",
                    "data.test_splits=[]",
                    "data.batch_size=null",
                    f"data.max_batch_seconds={synthetic_batch_seconds}",
                    "data.max_duration=null",
                ]
            )
            loader["long_files"] = throughput(long_data, long_utterances, workers, seconds, rounds)
    if archive_shards:
        with tempfile.TemporaryDirectory() as tmp:
            folders = {location for split in datamodule.train_splits for location in datamodule.source.locations(split)}
            if len(folders) != 1 or not Path(next(iter(folders))).is_dir():
                raise SystemExit(f"--archive-shards packs one train split folder; the train splits are {folders}")
            loader["archive"] = archive_reading(folders.pop(), archive_shards, Path(tmp), archive_http)
    budget = datamodule.budget.max_batch_seconds or synthetic_batch_seconds
    return {
        "corpus": {"splits": datamodule.train_splits, "root": str(datamodule.root)},
        "loader": loader,
        "padding": {
            "corpus": padding([u.duration for u in utterances], budget, datamodule.shuffle_buffer),
            "synthetic": padding(
                librispeech_like_durations(synthetic_hours), synthetic_batch_seconds, datamodule.shuffle_buffer
            ),
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m asr.data.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="0,2", help="comma-separated data.num_workers values to time")
    parser.add_argument("--seconds", type=float, default=20.0, help="time for each measurement, split over the rounds")
    parser.add_argument("--rounds", type=int, default=3, help="loader and plain timings alternated this often")
    parser.add_argument("--synthetic-hours", type=float, default=100.0)
    parser.add_argument(
        "--synthetic-batch-seconds",
        type=float,
        default=200.0,
        help="max_batch_seconds of the synthetic sets (and of the corpus without one)",
    )
    parser.add_argument(
        "--long-files",
        type=int,
        default=300,
        help="FLAC files of LibriSpeech-like durations to time the loader on (0: none)",
    )
    parser.add_argument(
        "--archive-shards",
        type=int,
        default=0,
        help="time a stream shard of this many reading a .tar.gz of the train split (0: not)",
    )
    parser.add_argument(
        "--archive-http",
        action="store_true",
        help="with --archive-shards, also read the archive from a local HTTP server of byte ranges",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    results = run(
        overrides,
        [int(n) for n in args.workers.split(",")],
        args.seconds,
        args.rounds,
        args.synthetic_hours,
        args.synthetic_batch_seconds,
        args.long_files,
        args.archive_shards,
        args.archive_http,
    )
    text = json.dumps(results, indent=1)
    if args.json:
        args.json.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
