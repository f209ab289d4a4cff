"""What several benchmarks share: the reduced demo workload, the cache, studies and plain trials.

The demo study (studies/demo.yaml: 10 trials, ~12 min at concurrency 2) is too long to run twice
inside one benchmark's 10 minutes, so the service benchmarks run a reduced version of it: the demo
spec with fewer training and validation questions and a subset of its methods. Every benchmark
prints what it ran.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

# Before any library that draws progress bars is imported: figures, not model-loading bars.
os.environ.setdefault("TQDM_DISABLE", "1")

from search.spec import StudySpec, load_spec  # noqa: E402

if TYPE_CHECKING:
    import torch

DEMO_SPEC = Path("studies/demo.yaml")
# The service benchmarks' workload: the demo's independent searches (none, then ft_embed and
# ft_gen over the demo's two learning rates each: 5 trials, 2 + 2 of them in stages that can run
# at once), on 16 training questions (2 generator steps of the demo's batch of 8) and 16
# validation questions (one evaluation batch).
STUDY_OVERRIDES: dict[str, object] = {
    "methods": ["none", "ft_embed", "ft_gen"],
    "data.n_train": 16,
    "data.n_validation": 16,
}


def setup_environment() -> Path:
    """Offline model loading and quiet libraries; returns the model/index cache folder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # As the CLI does: Ray's session files under a short path, no Tune loggers or new output.
    os.environ.setdefault(
        "RAY_TMPDIR", str(Path(os.environ.get("TMPDIR", "/tmp")) / "ragsweep-ray")
    )
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    return Path(os.environ.get("RAGSWEEP_CACHE", Path.home() / ".cache" / "ragsweep"))


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timer read after it counts that work."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_average() -> str:
    """The 1/5/15-minute load averages, as `uptime` prints them."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def reduced_spec(overrides: dict[str, object] | None = None, **fields: object) -> StudySpec:
    """The demo spec with ``STUDY_OVERRIDES`` (or ``overrides``) applied, then ``fields`` replaced."""
    spec = load_spec(DEMO_SPEC, STUDY_OVERRIDES if overrides is None else overrides)
    return spec.model_copy(update=fields) if fields else spec


@dataclass(frozen=True)
class StudyRun:
    """One launched study: wall time, each stage's trial metrics and its best trial's rates."""

    wall_s: float
    trials: dict[str, list[dict[str, float]]]
    best_rates: dict[str, dict[str, float | None]]  # stage -> lr_embedder, lr_generator
    failed: int


def run_study(spec: StudySpec, *, cache_dir: Path, workdir: Path) -> StudyRun:
    """Launch ``spec`` on a local Ray into a fresh SQLite file under ``workdir``, the real service."""
    import optuna

    from search.launch.dispatch import launch
    from search.plan import make_plan
    from search.store import best_trial, open_storage, read_trials, stage_study_name

    storage_url = f"sqlite:///{workdir / f'{spec.name}.db'}"
    start = time.perf_counter()
    summary = launch(spec, storage_url=storage_url, runs_dir=workdir / "runs", cache_dir=cache_dir)
    wall_s = time.perf_counter() - start
    storage = open_storage(storage_url)
    trials, best_rates = {}, {}
    for stage in make_plan(spec).stages:
        study = optuna.load_study(study_name=stage_study_name(spec, stage.name), storage=storage)
        records = read_trials(study)
        trials[stage.name] = [dict(trial.metrics) for trial in records]
        first = spec.objectives[0]  # the service's own choice (ties go to the earliest trial)
        best = best_trial(records, first.metric, maximize=first.direction == "maximize")
        if best is not None:
            config = best.config
            best_rates[stage.name] = {
                rate: config[rate] for rate in ("lr_embedder", "lr_generator")
            }
    return StudyRun(
        wall_s=wall_s, trials=trials, best_rates=best_rates, failed=sum(summary.failed.values())
    )


def independent_trials(spec: StudySpec) -> list[tuple[str, dict[str, float]]]:
    """(method, learning rates) of every trial of a plan whose stages depend on no other stage."""
    from search.plan import grid_points, make_plan

    trials = []
    for stage in make_plan(spec).stages:
        if stage.fixed_from or stage.reuse_from:
            raise ValueError(f"stage '{stage.name}' depends on another stage; not a plain trial")
        trials += [(stage.method, point) for point in grid_points(stage, spec)]
    return trials


def run_plain_trials(
    spec: StudySpec,
    trials: list[tuple[str, dict[str, float]]],
    *,
    cache_dir: Path,
    threads: int,
    warm_up: bool = False,
) -> tuple[float, list[dict[str, float]]]:
    """The trials back to back in one fresh Python process, no Ray or database.

    Returns (wall seconds of the trials, their metrics). A child process, so that the models and
    buffers it leaves behind do not sit in the benchmark's own process next to a study's trials
    (a 24 GiB machine holds two demo generator trials and not much more). ``warm_up`` runs the
    first trial once, untimed, so that first imports and a cold page cache are not counted.
    """
    job = {
        "spec": spec.model_dump(mode="json"),
        "trials": trials,
        "cache_dir": str(cache_dir),
        "threads": threads,
        "warm_up": warm_up,
    }
    child = subprocess.run(
        [sys.executable, __file__],
        input=json.dumps(job),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # model-loading progress bars and warnings
        text=True,
        check=True,
    )
    result = json.loads(child.stdout.strip().splitlines()[-1])
    return result["wall_s"], result["metrics"]


def run_plain_trials_side_by_side(
    spec: StudySpec,
    trials: list[tuple[str, dict[str, float]]],
    *,
    cache_dir: Path,
    threads: int,
    lanes: int,
    warm_up: bool = False,
) -> list[dict[str, float]]:
    """The trials' metrics, in ``trials``' order, run by :func:`run_plain_trials` in ``lanes``
    child processes at once (as a launch's concurrency shares the machine), lane i taking every
    ``lanes``-th trial from the i-th."""
    with ThreadPoolExecutor(max_workers=lanes) as pool:  # each call waits on its own child
        runs = [
            pool.submit(
                run_plain_trials,
                spec,
                trials[lane::lanes],
                cache_dir=cache_dir,
                threads=threads,
                warm_up=warm_up,
            )
            for lane in range(lanes)
        ]
        lane_metrics = [run.result()[1] for run in runs]
    return [lane_metrics[i % lanes][i // lanes] for i in range(len(trials))]


def device_name(device: torch.device) -> str:
    """The GPU's name, or "CPU"."""
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def _plain_trials_child() -> None:
    """The child of :func:`run_plain_trials`: reads its job on stdin, prints the result last."""
    import torch

    from search.spec import trial_config
    from trainers import run_trial

    job = json.loads(sys.stdin.read())
    spec, cache_dir = StudySpec.model_validate(job["spec"]), Path(job["cache_dir"])
    torch.set_num_threads(job["threads"])  # as dispatch does: one thread per CPU a trial asks for

    def run(method: str, rates: dict[str, float]) -> dict[str, float]:
        config = trial_config(
            spec,
            method,
            lr_embedder=rates.get("lr_embedder"),
            lr_generator=rates.get("lr_generator"),
        )
        return run_trial(config, cache_dir=cache_dir).metrics

    if job["warm_up"]:
        run(*job["trials"][0])
    start = time.perf_counter()
    metrics = [run(method, rates) for method, rates in job["trials"]]
    print(json.dumps({"wall_s": time.perf_counter() - start, "metrics": metrics}))


def workdir(prefix: str) -> tempfile.TemporaryDirectory[str]:
    """A throw-away folder for a benchmark's databases and run folders."""
    return tempfile.TemporaryDirectory(prefix=f"ragsweep-bench-{prefix}-")


if __name__ == "__main__":
    setup_environment()
    _plain_trials_child()
