"""Sweeps, as a user runs them (``python -m asr.train -m ...``): folders named after the swept keys, a summary of
every point, a failing point among others, DDP points; the submitit launchers (SLURM's sbatch script, without
SLURM) and the Optuna search config."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from asr.config import CONFIG_DIR, compose
from asr.sweeps import point_argv, point_name, summary_table, swept_keys, write_summary
from tests.helpers import TINY_MODEL

REPO = Path(__file__).resolve().parents[1]


def demo_point(root, steps=2):
    """The demo on the fixture corpus for ``steps`` steps, validated once (so that there is a val/wer)."""
    return [
        "experiment=demo",
        f"data.root={root}",
        "data/source=folder",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        "trainer.check_val_every_n_epoch=null",
        "trainer.max_time=null",
        "data.num_workers=0",
        "~logger",
        *TINY_MODEL,
    ]


def multirun(*overrides, cwd, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "asr.train", "-m", *overrides],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)},
    )


def the_sweep(cwd: Path) -> Path:
    (sweep,) = cwd.glob("multirun/*/*")  # one sweep folder: no rank started a sweep of its own
    return sweep


def search_override() -> str:
    """``hparams_search=optuna``, or ``+hparams_search=optuna`` while the root config's defaults do not list the
    group."""
    try:
        compose("train", ["hparams_search=optuna"])
        return "hparams_search=optuna"
    except Exception:
        return "+hparams_search=optuna"


# ------------------------------------------------------------------------------------------------ folder names


def test_a_point_is_named_after_its_swept_overrides_only():
    overrides = ["optimizer.lr=0.001", "experiment=demo", "data.root=/data/x", "trainer.max_steps=30"]
    assert point_name(overrides, {"optimizer.lr"}, 0) == "optimizer.lr=0.001"
    both = ["seed=2", "optimizer.lr=0.003", "data/source=archive", "model.pretrained=/m/a"]
    assert (
        point_name(both, {"seed", "optimizer.lr", "data/source"}, 5) == "data.source=archive,optimizer.lr=0.003,seed=2"
    )
    assert point_name(both, {"model.pretrained"}, 5) == "model.pretrained=_m_a"  # one folder, never nested
    assert point_name(overrides, set(), 3) == "3"  # nothing swept: the job number
    assert point_name(['name="a b"', "x=${y}"], {"name", "x"}, 0) == "name=a b,x={y}"  # no quotes, no interpolation
    drawn = ["optimizer.lr=0.0003630376073213172", "++model.config.mask_feature_prob=0.4", "x=1"]
    assert point_name(drawn, {"optimizer.lr", "model.config.mask_feature_prob"}, 7, numbered=True) == (
        "7-model.config.mask_feature_prob=0.4,optimizer.lr=0.000363"
    )
    long = point_name([f"k{i}={'v' * 40}" for i in range(10)], {f"k{i}" for i in range(10)}, 0)
    assert len(long) == 200 and long.startswith("k0=")


def test_swept_keys_are_those_given_several_values():
    config = OmegaConf.create(
        {
            "hydra": {
                "overrides": {
                    "task": ["optimizer.lr=1e-3,3e-3", "trainer.devices=2", "model=choice(hubert_tiny,hubert_large)"]
                },
                "sweeper": {"params": {"decoder.lm_weight": "0.5,1,2", "seed": "1", "+x": "range(1,3)"}},
            }
        }
    )
    assert swept_keys(config) == {"optimizer.lr", "model", "decoder.lm_weight", "x"}


def test_a_point_reruns_as_a_single_run_of_its_own_overrides():
    """What Lightning's DDP launcher runs for the other ranks of a sweep point."""
    hydra = OmegaConf.create(
        {
            "overrides": {
                "hydra": ["hydra.mode=MULTIRUN", "hydra/launcher=local", "hydra.sweep.dir=s", "hydra.verbose=true"],
                "task": ["optimizer.lr=0.001", "experiment=demo", "~logger"],
            }
        }
    )
    argv = ["asr/train.py", "-m", "--config-name", "train", "optimizer.lr=1e-3,3e-3", "experiment=demo", "~logger"]
    assert point_argv(hydra, argv) == [
        "asr/train.py",
        "--config-name",
        "train",
        "hydra.verbose=true",
        "hydra.mode=RUN",
        "optimizer.lr=0.001",
        "experiment=demo",
        "~logger",
    ]


def test_the_summary_lists_every_point_and_a_killed_one(tmp_path):
    for name, point in {
        "a=1": {"job": 0, "dir": "a=1", "status": "completed", "value": 0.25, "error": None},
        "a=2": {"job": 1, "dir": "a=2", "status": "failed", "value": None, "error": "ValueError: no"},
    }.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "sweep_point.json").write_text(json.dumps(point))
    (tmp_path / "a=3" / ".hydra").mkdir(parents=True)  # started, never recorded: killed
    (tmp_path / "a=3" / ".hydra" / "overrides.yaml").write_text("- a=3\n")
    summary = write_summary(tmp_path, "val/wer")
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert [(p["dir"], p["status"]) for p in summary["points"]] == [
        ("a=1", "completed"),
        ("a=2", "failed"),
        ("a=3", "no result"),
    ]
    assert summary["failed"] == 2 and summary["points"][2]["overrides"] == ["a=3"]
    table = summary_table(summary)
    assert "3 points, 2 failed" in table and "0.2500" in table and "ValueError: no" in table


# ---------------------------------------------------------------------------------------------- sweeps, for real


def test_a_sweep_of_ddp_points(demo_root, tmp_path):
    """Two points, each a 2-rank DDP run on CPU: folders named after the swept key, both ranks of each point in its
    folder, metrics, and the summary with each point's val/wer."""
    result = multirun(
        "optimizer.lr=1e-3,3e-3",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "+callbacks.ids._target_=tests.ddp_helpers.TrainedIds",
        "+callbacks.ids.folder=${hydra:runtime.output_dir}",
        *demo_point(demo_root),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = the_sweep(tmp_path)
    points = {p.name for p in sweep.iterdir() if p.is_dir()}
    assert points == {"optimizer.lr=0.001", "optimizer.lr=0.003"}
    for name in points:
        folder = sweep / name
        assert "val/wer" in json.loads((folder / "metrics.json").read_text())
        assert (folder / "rank0.txt").read_text() and (folder / "rank1.txt").read_text()  # both ranks trained here
        assert "optimizer.lr=" in (folder / ".hydra" / "overrides.yaml").read_text()
    summary = json.loads((sweep / "summary.json").read_text())
    assert [(p["dir"], p["status"]) for p in summary["points"]] == [
        ("optimizer.lr=0.001", "completed"),
        ("optimizer.lr=0.003", "completed"),
    ]
    for point in summary["points"]:
        metrics = json.loads((sweep / point["dir"] / "metrics.json").read_text())
        assert point["val/wer"] == pytest.approx(metrics["val/wer"])
    assert "Sweep summary" in result.stdout and "optimizer.lr=0.003" in result.stdout


def test_a_failing_point_does_not_stop_the_sweep(demo_root, tmp_path):
    """The first point fails inside its DDP run (an invalid learning rate); the second still runs, and the summary
    names the error. The command exits with status 1."""
    result = multirun(
        "optimizer.lr=-1,1e-3", "trainer.devices=2", "trainer.strategy=ddp", *demo_point(demo_root), cwd=tmp_path
    )
    assert result.returncode == 1, result.stderr[-3000:]
    sweep = the_sweep(tmp_path)
    assert (sweep / "optimizer.lr=0.001" / "metrics.json").is_file()
    failed, done = json.loads((sweep / "summary.json").read_text())["points"]
    assert failed["dir"] == "optimizer.lr=-1" and failed["status"] == "failed"
    assert "Invalid learning rate" in failed["error"] and failed["val/wer"] is None
    assert done["dir"] == "optimizer.lr=0.001" and done["status"] == "completed" and done["val/wer"] is not None
    assert "1 failed" in result.stdout
    assert "Invalid learning rate" in (sweep / "optimizer.lr=-1" / "train.log").read_text()  # with its traceback


@pytest.mark.slow
def test_submitit_local_runs_a_point_with_a_task_per_device(demo_root, tmp_path):
    """hydra/launcher=local: a submitit job for the point, two tasks that are its two DDP ranks."""
    result = multirun(
        "hydra/launcher=local",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "+callbacks.ids._target_=tests.ddp_helpers.TrainedIds",
        "+callbacks.ids.folder=${hydra:runtime.output_dir}",
        *demo_point(demo_root),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = the_sweep(tmp_path)
    point = sweep / "0"  # nothing swept: the job number
    assert "val/wer" in json.loads((point / "metrics.json").read_text())
    assert (point / "rank0.txt").read_text() and (point / "rank1.txt").read_text()
    assert len(list(sweep.glob(".submitit/*/*_result.pkl"))) == 2  # one result per task
    (summary,) = json.loads((sweep / "summary.json").read_text())["points"]
    assert summary["status"] == "completed" and summary["val/wer"] is not None


@pytest.mark.slow
def test_an_optuna_search_runs_its_trials(demo_root, tmp_path):
    result = multirun(search_override(), "hydra.sweeper.n_trials=2", *demo_point(demo_root), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = the_sweep(tmp_path)
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert set(best.best_params) == {
        "optimizer.lr",
        "scheduler.warmup_steps",
        "model.config.mask_time_prob",
        "++model.config.mask_feature_prob",
    }
    points = json.loads((sweep / "summary.json").read_text())["points"]
    assert [p["job"] for p in points] == [0, 1] and all(p["status"] == "completed" for p in points)
    assert all(p["dir"].startswith(f"{p['job']}-") and "optimizer.lr=" in p["dir"] for p in points)
    assert best.best_value == pytest.approx(min(p["val/wer"] for p in points))


# ---------------------------------------------------------------------------------------------------- configs


def test_the_slurm_launcher_submits_a_task_per_gpu_on_every_node(tmp_path, monkeypatch):
    """hydra/launcher=slurm: the sbatch script submitit would submit for a sweep point (no SLURM here)."""
    import submitit
    from hydra.utils import instantiate

    cfg = compose(
        "train",
        [
            "hydra/launcher=slurm",
            "trainer.devices=8",
            "trainer.num_nodes=4",
            "hydra.launcher.partition=gpu",
            "hydra.launcher.account=speech",
            "hydra.launcher.timeout_min=720",
            f"hydra.sweep.dir={tmp_path}",
        ],
        hydra_config=True,
    )
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    assert launcher.params["nodes"] == cfg.trainer.num_nodes == 4
    assert launcher.params["tasks_per_node"] == launcher.params["gpus_per_node"] == cfg.trainer.devices == 8

    executors = []
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # "srun is there"
    monkeypatch.setattr(submitit.AutoExecutor, "map_array", lambda self, fn, *args: executors.append(self) or [])
    launcher.config = cfg
    launcher.launch([["optimizer.lr=0.001"]], initial_job_idx=0)
    script = executors[0]._executor._make_submission_file_text("python -m asr.train", "uid")
    for line in (
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=speech",
        "#SBATCH --time=720",
        f"#SBATCH --output={tmp_path}/.submitit/%j/%j_0_log.out",
    ):
        assert line in script
    assert "\nsrun " in script


def test_the_local_launcher_runs_a_task_per_device():
    cfg = compose("train", ["hydra/launcher=local", "experiment=demo", "trainer.devices=2"], hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("LocalLauncher")
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (1, 2, 2)


def test_the_optuna_search_space():
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override
    from optuna.distributions import IntUniformDistribution, LogUniformDistribution, UniformDistribution

    cfg = compose("train", [search_override(), "experiment=demo"], hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "minimize"
    assert cfg.optimized_metric == "val/wer" and sweeper.max_failure_rate == 1.0
    parser = OverridesParser.create()
    space = {
        key: create_optuna_distribution_from_override(parser.parse_override(f"{key}={value}"))
        for key, value in sweeper.params.items()
    }
    assert space == {
        "optimizer.lr": LogUniformDistribution(1e-5, 1e-3),
        "scheduler.warmup_steps": IntUniformDistribution(0, 4000),
        "model.config.mask_time_prob": UniformDistribution(0.0, 0.75),
        "++model.config.mask_feature_prob": UniformDistribution(0.0, 0.5),
    }
    assert swept_keys(cfg) == {k.lstrip("+") for k in space}
    # Every searched key exists in the demo's and the card's model config (or is added: ++).
    for experiment in ("demo", "hubert_large_ls100h"):
        composed = compose("train", [f"experiment={experiment}", *(f"{k}={0}" for k in space)])
        assert composed.scheduler.warmup_steps == 0


def test_the_recipes_compose():
    """The recipes aimed past the model card: fairseq's fine-tuning settings (docs/recipes.md)."""
    plus = compose("train", ["experiment=hubert_large_ls100h_plus"])
    assert plus.scheduler._target_ == "asr.schedules.tri_stage" and plus.scheduler.decay == "exponential"
    assert (plus.scheduler.warmup_steps, plus.scheduler.hold_fraction, plus.trainer.max_steps) == (8000, 0.4, 80000)
    assert (plus.data.batch_size, plus.data.max_batch_seconds) == (None, 200)
    config = plus.model.config
    assert (config.mask_time_prob, config.mask_time_length) == (0.5, 10)
    assert (config.mask_feature_prob, config.mask_feature_length, config.layerdrop) == (0.5, 64, 0.1)
    assert plus.trainer.strategy == "ddp_find_unused_parameters_true"  # LayerDrop under DDP
    assert list(plus.data.train_splits) == ["train-clean-100"] and list(plus.data.val_splits) == ["dev-clean"]
    full = compose("train", ["experiment=hubert_large_ls960"])
    assert list(full.data.train_splits) == ["train-960"] and full.trainer.max_steps == 320000
    assert (CONFIG_DIR / "experiment" / "hubert_large_ls100h.yaml").is_file()  # the faithful one stays
