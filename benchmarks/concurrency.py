"""Benchmark 2: study throughput at concurrency 2 against concurrency 1 (one thread per trial).

The reduced demo workload (benchmarks/_common.py: none, ft_embed x 2 rates, ft_gen x 2 rates on
16 training and 16 validation questions) is launched twice through `search.launch.dispatch.launch`, each
time into a fresh SQLite database on a local Ray: at concurrency 1, then at concurrency 2, every
trial asking for 1 CPU (dispatch then gives it one torch thread). Printed: both wall times, the
throughput ratio (trials/s at 2 over trials/s at 1, i.e. wall at 1 / wall at 2; target at least
1.6) and the load average before and after each. The three stages do not depend on each other, so
at concurrency 2 the launch runs them side by side (the single-trial stage `none` beside an ft_embed
or ft_gen trial). Also printed: the trials' own mean wall time at each setting, whose ratio shows how much two trials slowed each other (or
other load slowed them) on the 2 cores.
Run: .venv/bin/python benchmarks/concurrency.py
"""

from __future__ import annotations

from pathlib import Path

from _common import load_average, reduced_spec, run_study, setup_environment, workdir


def main() -> None:
    cache_dir = setup_environment()
    walls: dict[int, float] = {}
    trial_s: dict[int, float] = {}  # the trials' own mean wall_s: slower at 2 when cores are short
    loads: dict[int, tuple[str, str]] = {}
    n_trials = 0
    for concurrency in (1, 2):
        spec = reduced_spec(concurrency=concurrency)
        before = load_average()
        with workdir(f"concurrency{concurrency}") as folder:
            study = run_study(spec, cache_dir=cache_dir, workdir=Path(folder))
        loads[concurrency] = (before, load_average())
        if study.failed:
            raise SystemExit(f"{study.failed} trial(s) failed at concurrency {concurrency}")
        walls[concurrency] = study.wall_s
        trials = [metrics for stage in study.trials.values() for metrics in stage]
        n_trials = len(trials)
        trial_s[concurrency] = sum(metrics["wall_s"] for metrics in trials) / n_trials

    print(f"workload: {n_trials} trials (stages none, ft_embed x 2, ft_gen x 2), 1 CPU each")
    for concurrency in (1, 2):
        before, after = loads[concurrency]
        print(
            f"concurrency {concurrency}: {walls[concurrency]:.1f} s, mean trial "
            f"{trial_s[concurrency]:.1f} s "
            f"(load average before {before}; after {after})"
        )
    print(
        f"mean trial time, concurrency 2 / 1: {trial_s[2] / trial_s[1]:.2f} "
        "(1.0 when each trial has a core of its own)"
    )
    print(f"throughput ratio, concurrency 2 / 1: {walls[1] / walls[2]:.2f} (target >= 1.6)")


if __name__ == "__main__":
    main()
