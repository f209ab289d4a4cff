"""Benchmark 1: what the service adds to the training it dispatches, at concurrency 1.

The reduced demo workload (benchmarks/_common.py: none, ft_embed x 2 rates, ft_gen x 2 rates on
16 training and 16 validation questions) runs twice: first back to back as plain
`trainers.run_trial` calls with one torch thread (what a Ray trial of 1 CPU gets), in one fresh
child process after one untimed warm-up trial there (first imports, a cold page cache); then as a
study through `search.launch.dispatch.launch` at concurrency 1 (a local Ray, Tune + Optuna, a fresh
SQLite database), timed from the call to its return. The cache is warm for both, so the
difference is Ray start-up, worker imports, the shared preparation and storage. Printed: both wall
times, how much of each the trials themselves account for (their own `wall_s`, from loading models
to the end of evaluation), the ratio launch / plain (target at most 1.15), and the load average
before and after each.
Run: .venv/bin/python benchmarks/dispatch_overhead.py
"""

from __future__ import annotations

from pathlib import Path

from _common import (
    independent_trials,
    load_average,
    reduced_spec,
    run_plain_trials,
    run_study,
    setup_environment,
    workdir,
)


def main() -> None:
    cache_dir = setup_environment()
    spec = reduced_spec(concurrency=1)
    trials = independent_trials(spec)

    load_plain = load_average()
    plain_s, plain_metrics = run_plain_trials(
        spec, trials, cache_dir=cache_dir, threads=1, warm_up=True
    )
    load_between = load_average()
    with workdir("dispatch") as folder:
        study = run_study(spec, cache_dir=cache_dir, workdir=Path(folder))
    load_after = load_average()

    print(f"workload: {len(trials)} trials {[method for method, _ in trials]}, 1 thread each")
    print(
        f"load average: before plain {load_plain}; before launch {load_between}; after {load_after}"
    )
    # The trials' own wall_s (loading models to evaluation) tells service time from trial time,
    # and shows when load on the machine slowed the trials of one side more than the other's.
    plain_inside = sum(metrics["wall_s"] for metrics in plain_metrics)
    launch_inside = sum(m["wall_s"] for stage in study.trials.values() for m in stage)
    print(
        f"plain trials back to back: {plain_s:.1f} s, of which inside trials {plain_inside:.1f} s"
    )
    print(
        f"ragsweep launch, concurrency 1: {study.wall_s:.1f} s ({study.failed} failed), of which "
        f"inside trials {launch_inside:.1f} s, outside {study.wall_s - launch_inside:.1f} s"
    )
    print(
        f"trial time, launch / plain: {launch_inside / plain_inside:.3f} (1.0 on an idle machine)"
    )
    print(f"dispatch overhead: launch / plain = {study.wall_s / plain_s:.3f} (target <= 1.15)")


if __name__ == "__main__":
    main()
