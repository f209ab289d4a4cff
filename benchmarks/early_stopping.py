"""Benchmark 8: a learning-rate search with early stopping against the same search without.

Workload: the demo spec reduced to `ft_gen` (RAG-Token LoRA on SmolLM2-135M) over a 5-value
generator grid (1e-5, 3e-5, 1e-4, 3e-4, 1e-3), 32 training questions (4 steps at batch 8: rungs
after steps 1 and 2) and 16 validation questions, launched twice through
`search.launch.dispatch.launch` at the demo's concurrency 2, each into a fresh SQLite database:
once with every trial run to its end, once with `search.early_stopping: true` (the defaults:
rungs at 0.25 and 0.5 of the phase, reduction factor 2, noise_z 2). The measure is what the issue
asks: training + evaluation CPU seconds summed over every trial, stopped ones included (their
rung signals are inside training).

Printed: each search's trials (state, rate, F1 or the rung it stopped at, CPU seconds), its pick,
the ratio early stopping / full, and the load average before and after each.
Run: .venv/bin/python benchmarks/early_stopping.py
"""

from __future__ import annotations

from pathlib import Path

from _common import load_average, reduced_spec, setup_environment, workdir

_OVERRIDES: dict[str, object] = {
    "methods": ["ft_gen"],
    "data.n_train": 32,
    "data.n_validation": 16,
    "search.lr_generator": [1e-5, 3e-5, 1e-4, 3e-4, 1e-3],
}


def main() -> None:
    import optuna

    from search.launch.dispatch import launch
    from search.store import best_trial, open_storage, read_trials, stage_study_name

    cache_dir = setup_environment()
    work_s: dict[bool, float] = {}
    picks: dict[bool, float | None] = {}
    for early_stopping in (False, True):
        spec = reduced_spec({**_OVERRIDES, "search.early_stopping": early_stopping})
        before = load_average()
        with workdir("early-stopping") as folder:
            url = f"sqlite:///{Path(folder) / 'bench.db'}"
            launch(spec, storage_url=url, runs_dir=Path(folder) / "runs", cache_dir=cache_dir)
            study = optuna.load_study(
                study_name=stage_study_name(spec, "ft_gen"), storage=open_storage(url)
            )
            trials = sorted(read_trials(study), key=lambda trial: trial.lr_generator or 0.0)
        label = "early stopping" if early_stopping else "full grid"
        print(f"{label} (load average before {before}; after {load_average()}):")
        for trial in trials:
            cpu_s = trial.metrics.get("train_device_s", 0.0) + trial.metrics.get(
                "eval.device_s", 0.0
            )
            outcome = (
                f"stopped at rung {trial.pruned_at.get('rung')}"
                if trial.pruned_at
                else f"F1 {trial.metrics.get('f1', float('nan')):.3f}"
            )
            print(
                f"  lr_generator {trial.lr_generator:g}: {trial.state}, {outcome}, {cpu_s:.1f} CPU-s"
            )
        work_s[early_stopping] = sum(
            t.metrics.get("train_device_s", 0.0) + t.metrics.get("eval.device_s", 0.0)
            for t in trials
        )
        best = best_trial(trials, "f1")
        picks[early_stopping] = best.lr_generator if best else None
        print(
            f"  training + evaluation: {work_s[early_stopping]:.1f} CPU-s; pick {picks[early_stopping]}"
        )
    print(f"same pick: {'yes' if picks[True] == picks[False] else 'no'}")
    print(
        f"training + evaluation CPU seconds, early stopping / full grid: "
        f"{work_s[True] / work_s[False]:.2f} ({work_s[True]:.0f} s against {work_s[False]:.0f} s)"
    )


if __name__ == "__main__":
    main()
