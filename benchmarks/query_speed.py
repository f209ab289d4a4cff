"""Benchmark: the query commands on a database of 5,000 trials, next to `optuna trials`.

A SQLite file is filled with 5,000 synthetic trials laid out as a launch of studies/demo.yaml
writes them (seven stage studies, the spec as a study attribute, and per trial the same user
attributes a real trial stores: ~50 metrics and a ~6 kB record with config, split ids and
environment). Each command then runs as a user runs it, a fresh `ragsweep` process, best of
three; `optuna trials` runs once per stage study (it reads one study at a time) and its times are
summed. Process start (the interpreter and `import search.cli`, which every command pays before
its own work) is measured apart, in a process that runs no command. Printed last: seconds per
command, its own work (less process start) and the ratio to `optuna trials` over the same trials.

    .venv/bin/python benchmarks/query_speed.py [--trials 5000]
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

from search.plan import make_plan
from search.spec import load_spec, trial_config
from search.store import SPEC_ATTR, TrialOutcome, open_stage_study, open_storage, trial_attrs
from trainers import environment_record

_DEMO = Path(__file__).resolve().parents[1] / "studies" / "demo.yaml"
_BIN = Path(sys.executable).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5000)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite:///{Path(folder) / 'queries.db'}"
        started = time.perf_counter()
        stage_names = _fill(url, args.trials)
        print(f"filled {url} with {args.trials} trials in {time.perf_counter() - started:.0f} s")
        ours = {
            "trials": _best_of_3(
                ["ragsweep", "trials", "demo", "--storage", url, "--format", "json"]
            ),
            "trials (table)": _best_of_3(["ragsweep", "trials", "demo", "--storage", url]),
            "trials (table, all rows)": _best_of_3(
                ["ragsweep", "trials", "demo", "--storage", url, "--limit", "0"]
            ),
            "best": _best_of_3(["ragsweep", "best", "demo", "--storage", url]),
            "pareto": _best_of_3(["ragsweep", "pareto", "demo", "--storage", url]),
            "compare": _best_of_3(["ragsweep", "compare", "demo", "--storage", url]),
            "studies": _best_of_3(["ragsweep", "studies", "--storage", url]),
        }
        optuna_s = sum(
            _best_of_3(["optuna", "trials", "--study-name", name, "--storage", url, "-f", "json"])
            for name in stage_names
        )
    start_s = _best_of_3(["python", "-c", "import search.cli"])
    print(
        f"\n{args.trials} trials in 7 stage studies, SQLite, fresh process per command, best of 3;"
        f" process start (python -c 'import search.cli') {start_s:.2f} s:"
    )
    print(f"{'command':<36}{'seconds':>9}{'own work':>10}{'vs optuna trials':>18}")
    print(f"{'optuna trials (7 studies)':<36}{optuna_s:>9.2f}{'':>10}{1.0:>17.2f}x")
    for command, seconds in ours.items():
        own_s = seconds - start_s
        print(
            f"{'ragsweep ' + command:<36}{seconds:>9.2f}{own_s:>10.2f}{seconds / optuna_s:>17.2f}x"
        )


def _fill(url: str, n_trials: int) -> list[str]:
    """Stage studies of the demo spec holding ``n_trials`` completed trials between them."""
    spec = load_spec(_DEMO)
    storage = open_storage(url)
    stages = make_plan(spec).stages
    environment = environment_record()
    split = {
        "train_ids": [f"1hop/person/p{i}/birthplace" for i in range(64)],
        "validation_ids": [f"2hop/person/p{i}/spouse/guild" for i in range(48)],
    }
    rng = random.Random(0)
    names = []
    for index, stage in enumerate(stages):
        study = open_stage_study(storage, spec, stage.name)
        names.append(study.study_name)
        assert SPEC_ATTR in storage.get_study_system_attrs(
            storage.get_study_id_from_name(study.study_name)
        )
        count = n_trials // len(stages) + (index < n_trials % len(stages))
        trials = []
        for _ in range(count):
            rates = {rate: 10 ** rng.uniform(-8, -3) for rate in stage.searched}
            config = trial_config(
                spec,
                stage.method,
                lr_embedder=rates.get("lr_embedder", 1e-5),
                lr_generator=rates.get("lr_generator", 1e-4),
            )
            metrics = _metrics(rng)
            record = {
                "config": config.model_dump(mode="json"),
                "seed": 0,
                "data_fingerprint": "f" * 64,
                "split": split,
                "has_context_labels": True,
                "phases": ["generator"],
                "reused_phases": [],
                "final_losses": {"generator": rng.uniform(1, 5)},
                "environment": environment,
            }
            trials.append(
                optuna.trial.create_trial(
                    params=rates,
                    distributions={
                        rate: optuna.distributions.FloatDistribution(1e-8, 1e-3, log=True)
                        for rate in rates
                    },
                    values=[metrics["f1"]],
                    user_attrs=trial_attrs(
                        TrialOutcome(
                            metrics=metrics,
                            method=stage.method,
                            stage=stage.name,
                            record=record,
                            node="0" * 56,
                        )
                    ),
                )
            )
        study.add_trials(trials)
    return names


def _metrics(rng: random.Random) -> dict[str, float]:
    metrics = {"em": rng.random(), "f1": rng.random(), "recall_at_k": rng.random(), "k": 5.0}
    for prefix in ("", "train_"):
        metrics |= {
            f"{prefix}wall_s": rng.uniform(10, 300),
            f"{prefix}device_s": rng.uniform(10, 300),
            f"{prefix}tokens": rng.randint(1_000, 100_000),
            f"{prefix}flops": rng.uniform(1e11, 1e14),
            f"{prefix}steps": rng.randint(1, 20),
        }
    for phase in ("load", "index", "generator", "eval"):
        metrics |= {
            f"{phase}.{figure}": rng.uniform(0, 1e12)
            for figure in ("wall_s", "device_s", "tokens", "flops", "peak_mem_mb", "steps")
        }
    return metrics


def _best_of_3(command: list[str]) -> float:
    times = []
    for _ in range(3):
        started = time.perf_counter()
        result = subprocess.run(
            [str(_BIN / command[0]), *command[1:]], capture_output=True, text=True, timeout=600
        )
        times.append(time.perf_counter() - started)
        if result.returncode != 0:
            raise SystemExit(f"{' '.join(command[:3])} failed: {result.stderr.strip()[-500:]}")
    return min(times)


if __name__ == "__main__":
    main()
