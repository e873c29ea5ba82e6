"""The loader benchmark command, as a fast smoke run on the small demo corpus."""

import json
import subprocess
import sys


def test_bench_command_reports_throughput_and_padding(demo_root, tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "asr.data.bench",
            "--workers",
            "0,1,2",
            "--seconds",
            "1",
            "--rounds",
            "1",
            "--synthetic-hours",
            "5",
            "--long-files",
            "6",
            "--synthetic-batch-seconds",
            "30",
            "--archive-shards",
            "2",
            "--archive-http",
            "--json",
            str(out),
            "experiment=demo",
            f"data.root={demo_root}",
            "data/source=folder",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert json.loads(result.stdout) == report
    for files, mean_duration in (("corpus", (1, 3)), ("long_files", (9, 17))):
        assert mean_duration[0] < report["loader"][files]["mean_duration"] < mean_duration[1]
        loader = report["loader"][files]["workers=0"]
        assert loader["audio_s_per_s"] > 0 and loader["plain_audio_s_per_s"] > 0
        ratio = round(loader["audio_s_per_s"] / loader["plain_audio_s_per_s"], 3)
        assert abs(loader["ratio"] - ratio) <= 0.002 and loader["per_worker"] == loader["ratio"]
        assert set(loader["cpu_ms_per_audio_s"]) == {"plain", "main"} and loader["cpu_ms_per_audio_s"]["main"] > 0
        worker = report["loader"][files]["workers=1"]
        cpu = worker["cpu_ms_per_audio_s"]
        # The report rounds the CPU times, so the efficiency recomputed from them may differ in the last digit.
        assert cpu["workers"] > 0
        assert abs(worker["worker_cpu_efficiency"] - cpu["plain"] / cpu["workers"]) <= 0.002
        assert "parallel_plain_audio_s_per_s" not in worker
        two = report["loader"][files]["workers=2"]
        assert two["parallel_plain_audio_s_per_s"] > 0
        assert abs(two["ratio_to_parallel_plain"] - two["audio_s_per_s"] / two["parallel_plain_audio_s_per_s"]) < 0.01
    archive = report["loader"]["archive"]
    assert archive["members"] > 100 and archive["shards"] == 2 and archive["shard"] == 1
    assert archive["streamed"]["audio_s_per_s"] > 0 and archive["by_region"]["audio_s_per_s"] > 0
    http = archive["over_http"]
    assert http["members"] == archive["members"]  # the scan over HTTP found every member
    assert http["streamed"]["audio_s_per_s"] > 0 and http["by_region"]["audio_s_per_s"] > 0
    synthetic = report["padding"]["synthetic"]
    assert 4.9 < synthetic["hours"] < 5.1 and 12 < 3600 * synthetic["hours"] / synthetic["utterances"] < 13.5
    assert synthetic["sampler"] >= 0.97 and synthetic["stream_buffer"] >= 0.97
    assert synthetic["random_fixed_size"] < synthetic["length_grouped"] < synthetic["sampler"]
    assert set(report["padding"]["corpus"]) == set(synthetic)


def test_an_empty_train_loader_is_an_error_not_an_endless_wait():
    import types

    import pytest

    from asr.data.bench import loader_rate

    datamodule = types.SimpleNamespace(
        train_splits=["train"], train_dataloader=lambda: [], transport=types.SimpleNamespace(num_workers=0)
    )
    with pytest.raises(ValueError, match=r"\['train'\].*yields no batches"):
        loader_rate(datamodule, 0, 1.0)
