"""Hydra sweeps (``python -m asr.train -m ...``): folders named after what the sweep varies, a summary of every point,
and points that may fail, or run DDP, without disturbing the others.

Registered by ``conf/train.yaml`` (``hydra.callbacks.sweep``); Hydra instantiates the callback, importing this module,
before any sweep point's folder is named, in the process that launches the sweep and, through the pickled callback, in
submitit's job processes.

- **Folder names.** ``hydra.sweep.subdir: ${asr.sweep_subdir:}`` names a point's folder after its values of the swept
  keys only, e.g. ``multirun/<date>/<time>/optimizer.lr=0.001``: keys given several values on the command line
  (``a=1,2``, ``choice(...)``, ``range(...)``, ``interval(...)``) or listed in ``hydra.sweeper.params``. A point's
  full overrides are in its ``.hydra/overrides.yaml``. With nothing swept the folder is the job number; under a
  sweeper that may draw the same values twice (Optuna) the job number comes first (``3-optimizer.lr=...``).
- **Summary.** Each point writes ``sweep_point.json`` (its overrides, the value ``asr.train`` returns for
  ``optimized_metric``, e.g. ``val/wer``, or its error); the sweep folder's ``summary.json`` gathers them after every
  point, and the sweep ends with a table of them.
- **Failures.** A point that raises is logged and recorded; the other points still run. Under Hydra's basic sweeper
  the failure is recorded rather than re-raised (Hydra would otherwise stop after the failing batch and skip the
  summary), and the command exits with status 1 after the table when any point failed. Sweepers with their own
  failure handling (Optuna: ``max_failure_rate``) get the failure as it is.
- **DDP inside a sweep.** Lightning starts the other ranks of a point by re-running the command line with the run
  folder; in a sweep that would re-run the whole sweep. For each point the command line becomes that point's own
  single run, and after it the environment variables and process group that DDP left behind are cleared, so the
  next point starts its own ranks. Under submitit's local executor, with a task per device
  (``conf/hydra/launcher/local.yaml``), the tasks are given the ranks torch.distributed reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import sys
import threading
import traceback
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger(__name__)

RESOLVER = "asr.sweep_subdir"
POINT_FILE = "sweep_point.json"
SUMMARY_FILE = "summary.json"
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
# What Lightning's DDP launcher and torch.distributed leave in the environment of the process that ran a point.
DISTRIBUTED_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE")
# Command-line overrides that only concern launching the sweep: a point's own run (a DDP rank) leaves them out.
LAUNCH_KEYS = ("hydra.mode", "hydra.sweep", "hydra.sweeper", "hydra/sweeper", "hydra.launcher", "hydra/launcher")
LAUNCH_KEYS += ("hydra.run.dir", "hydra.job.name", "hydra.output_subdir")
CONFIG_FLAGS = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd")
MAX_NAME = 200
# Left out of folder names: quotes and interpolations would break the run folder Lightning passes to other ranks.
UNSAFE = str.maketrans("", "", "\"'$\\")


class _Sweep:
    """The sweep this process takes part in: the swept keys (None: not in a sweep) and whether names are numbered."""

    keys: frozenset[str] | None = None
    numbered: bool = False


def _overrides(node: Any) -> list[str]:
    """A list of overrides as written: ``${...}`` in a value stays unresolved (it is the point's to resolve)."""
    return [str(o) for o in (OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node)]


def swept_keys(config: DictConfig) -> frozenset[str]:
    """The keys a sweep varies: those with several values (``a=1,2``, ``choice``, ``range``, ``interval``, ``glob``)
    on the command line or in ``hydra.sweeper.params``, and the keys of Optuna's older ``search_space``."""
    lines = _overrides(config.hydra.overrides.task)
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    keys = {str(k).lstrip("+~") for k in OmegaConf.select(config, "hydra.sweeper.search_space") or {}}
    parser = OverridesParser.create()
    for line in lines + [f"{k}={v}" for k, v in params.items()]:
        try:
            (override,) = parser.parse_overrides([line])
        except Exception:  # a form only its sweeper reads: taken as swept
            keys.add(line.partition("=")[0].lstrip("+~"))
            continue
        if override.is_sweep_override():
            keys.add(override.key_or_group)
    return frozenset(keys)


def point_name(overrides: Iterable[str], keys: Iterable[str], num: Any = None, numbered: bool = False) -> str:
    """A sweep point's folder: its swept overrides, sorted and joined by commas (``optimizer.lr=0.001``); the job
    number when nothing is swept, or first when ``numbered``. Safe as one folder name: ``/`` becomes ``.`` in keys
    (config groups) and ``_`` in values, quotes, ``$`` and backslashes are left out; a long name is cut and ends with
    a hash of the whole."""
    keys = set(keys)
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    items = sorted(
        f"{o.key_or_group.replace('/', '.')}={_value(o, numbered).replace('/', '_').translate(UNSAFE)}"
        for o in parsed
        if o.key_or_group in keys
    )
    number = "0" if num is None else str(num)
    if not items:
        return number
    name = ",".join(items)
    if numbered:
        name = f"{number}-{name}"
    if len(name) > MAX_NAME:
        name = f"{name[: MAX_NAME - 9]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return name


def _value(override: Any, short: bool) -> str:
    """An override's value as written; a float to 4 significant digits when ``short`` (numbered names: Optuna's
    draws, e.g. 0.0003630376073213172, become 0.000363)."""
    value = override.value()
    if short and isinstance(value, float):
        return f"{value:.4g}"
    return override.get_value_element_as_str()


def sweep_subdir() -> str:
    """``${asr.sweep_subdir:}``: the running point's folder name (:func:`point_name`), from Hydra's job config."""
    hydra = HydraConfig.get()
    num = OmegaConf.select(hydra, "job.num", default=None)
    keys = _Sweep.keys if _Sweep.keys is not None else frozenset()
    return point_name(_overrides(hydra.overrides.task), keys, num, _Sweep.numbered)


if not OmegaConf.has_resolver(RESOLVER):
    OmegaConf.register_new_resolver(RESOLVER, sweep_subdir)


def point_argv(hydra: DictConfig, argv: Sequence[str]) -> list[str]:
    """The command line of one sweep point as a single run: the config flags of ``argv``, the Hydra overrides that
    do not concern launching, and the point's overrides. (Lightning appends the run folder when it starts ranks.)"""
    flags, rest = [], list(argv[1:])
    while rest:
        arg = rest.pop(0)
        name = arg.partition("=")[0]
        if name in CONFIG_FLAGS:
            flags.append(arg)
            if "=" not in arg and rest:
                flags.append(rest.pop(0))
    hydra_overrides = [
        o for o in _overrides(hydra.overrides.hydra) if not o.lstrip("+~").partition("=")[0].startswith(LAUNCH_KEYS)
    ]
    return [argv[0], *flags, *hydra_overrides, "hydra.mode=RUN", *_overrides(hydra.overrides.task)]


def _rank() -> int:
    """This process's rank in its job (0 outside distributed jobs)."""
    for name in ("SLURM_PROCID", "RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def _export_submitit_local_ranks() -> None:
    """Under submitit's local executor with several tasks, the ranks torch.distributed (and Lightning) read; SLURM
    jobs need nothing, Lightning reads SLURM's variables."""
    if "SUBMITIT_LOCAL_JOB_ID" not in os.environ or int(os.environ.get("SUBMITIT_LOCAL_NTASKS", "1")) < 2:
        return
    import submitit

    env = submitit.JobEnvironment()
    port = random.Random(env.job_id).randint(20_000, 60_000)  # the same in every task of the job
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(env.num_tasks),
        RANK=str(env.global_rank),
        LOCAL_RANK=str(env.local_rank),
        NODE_RANK="0",
    )


def _release_distributed() -> None:
    """What a point's DDP run leaves in the process: its process group, and Lightning's watcher of the ranks it
    started, which kills this process (the whole sweep) when one of them ended badly, as they do when a point fails."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for thread in threading.enumerate():
        if type(thread).__name__ == "_ChildProcessObserver":  # lightning.fabric.strategies.launchers.subprocess_script
            thread._child_processes = []  # nothing left to watch: it ends at its next look


def _error(exception: BaseException) -> str:
    return f"{type(exception).__name__}: {exception}"[:2000]


def read_points(sweep_dir: Path) -> list[dict]:
    """The record of every point under ``sweep_dir``, by job number; a point folder without one (the job was killed
    before it ended) is listed with ``status: "no result"``."""
    points = {}
    for path in sweep_dir.rglob(POINT_FILE):
        try:
            point = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        points[point["dir"]] = point
    for overrides in sweep_dir.rglob(".hydra/overrides.yaml"):
        folder = overrides.parent.parent
        name = str(folder.relative_to(sweep_dir))
        if name not in points:
            points[name] = {"job": None, "dir": name, "status": "no result", "overrides": _read_list(overrides)}
    return sorted(points.values(), key=lambda p: (p["job"] is None, p["job"] or 0, p["dir"]))


def _read_list(path: Path) -> list[str]:
    try:
        return [str(o) for o in OmegaConf.load(path)]
    except Exception:
        return []


def write_summary(sweep_dir: Path, metric: str | None) -> dict:
    """``<sweep_dir>/summary.json`` from the points' records, written whole (a temporary file renamed)."""
    points = read_points(sweep_dir)
    failed = sum(p["status"] != "completed" for p in points)
    summary = {"sweep_dir": str(sweep_dir), "metric": metric, "points": points, "failed": failed}
    tmp = sweep_dir / f".{SUMMARY_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(sweep_dir / SUMMARY_FILE)
    return summary


def summary_table(summary: dict) -> str:
    metric = summary["metric"] or "value"
    rows = [("job", metric, "point", "error")]
    for p in summary["points"]:
        value = p.get("value")
        shown = f"{value:.4f}" if isinstance(value, float) else ("-" if value is None else str(value))
        rows.append(
            (
                "?" if p["job"] is None else str(p["job"]),
                shown if p["status"] == "completed" else p["status"],
                p["dir"],
                p.get("error") or "",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0]:>{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}".rstrip() for r in rows]
    count = len(summary["points"])
    head = f"Sweep summary ({Path(summary['sweep_dir']) / SUMMARY_FILE}): {count} point{'s' * (count != 1)}"
    return "\n".join([head + (f", {summary['failed']} failed" if summary["failed"] else ""), *lines])


class SweepCallback(Callback):
    """Names sweep folders, records and summarises sweep points, and keeps DDP points apart (module docstring)."""

    def __init__(self, exit_on_failure: bool = True) -> None:
        """``exit_on_failure``: under the basic sweeper, exit with status 1 after the summary when a point failed."""
        self.exit_on_failure = exit_on_failure
        self.keys: frozenset[str] | None = None
        self.numbered = False
        self._argv: list[str] | None = None
        self._env: dict[str, str | None] = {}

    def __setstate__(self, state: dict) -> None:
        # Unpickled in a submitit job: the sweep's keys name this process's point folders too.
        self.__dict__.update(state)
        self._activate()

    def _activate(self) -> None:
        _Sweep.keys, _Sweep.numbered = self.keys, self.numbered

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.keys = swept_keys(config)
        self.numbered = OmegaConf.select(config, "hydra.sweeper._target_") != BASIC_SWEEPER
        self._activate()
        log.info("Sweep over: %s", ", ".join(sorted(self.keys)) or "nothing (folders by job number)")

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        self._env = {k: os.environ.get(k) for k in DISTRIBUTED_ENV}
        _export_submitit_local_ranks()
        hydra = HydraConfig.get()
        self._argv = sys.argv
        sys.argv = point_argv(hydra, sys.argv)
        with read_write(hydra), open_dict(hydra):
            hydra.run.dir = hydra.runtime.output_dir  # where Lightning tells the other ranks to run

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        rank = _rank()
        if self._argv is not None:
            sys.argv, self._argv = self._argv, None
        env_set = set(config.hydra.job.env_set or {})
        for name, value in self._env.items():
            if name in env_set:
                continue
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _release_distributed()
        if rank != 0:
            return
        self._record(config, job_return)

    def _record(self, config: DictConfig, job_return: JobReturn) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        output_dir = Path(config.hydra.runtime.output_dir)
        metric = config.get("optimized_metric")
        point = {
            "job": config.hydra.job.num,
            "dir": os.path.relpath(output_dir, sweep_dir),
            "overrides": [str(o) for o in job_return.overrides or []],
            "status": "completed",
            "value": None,
            "error": None,
        }
        if job_return.status == JobStatus.COMPLETED:
            value = job_return.return_value
            point["value"] = float(value) if isinstance(value, int | float) else value
        else:
            error = job_return._return_value
            point.update(status="failed", error=_error(error))
            trace = "".join(traceback.format_exception(error)) if isinstance(error, BaseException) else str(error)
            log.error("Sweep point %s (%s) failed:\n%s", point["job"], point["dir"], trace)
            if config.hydra.sweeper.get("_target_") == BASIC_SWEEPER:
                # Recorded, not re-raised: the basic sweeper would stop at the end of this batch, summary unwritten.
                job_return.status = JobStatus.COMPLETED
                job_return.return_value = None
        if metric:
            point[metric] = point["value"]
        try:
            json.dumps(point)
        except TypeError:
            point["value"] = repr(point["value"])
            if metric:
                point[metric] = point["value"]
        (output_dir / POINT_FILE).write_text(json.dumps(point, indent=1))
        write_summary(sweep_dir, metric)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        if not sweep_dir.is_dir():
            return
        summary = write_summary(sweep_dir, config.get("optimized_metric"))
        # Printed, not logged: Hydra's log file at this point is the last point's.
        print(summary_table(summary), flush=True)
        basic = OmegaConf.select(config, "hydra.sweeper._target_") == BASIC_SWEEPER
        if summary["failed"] and basic and self.exit_on_failure:
            # SystemExit passes through Hydra's callback wrapper (it catches Exception only): the command fails.
            sys.exit(1)
