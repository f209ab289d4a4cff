"""Benchmark 2: study throughput at concurrency 2 against concurrency 1 (one thread per trial).

The reduced demo workload (benchmarks/_common.py: none, ft_embed x 2 rates, ft_gen x 2 rates on
16 training and 16 validation questions) is launched twice through `search.dispatch.launch`, each
time into a fresh SQLite database on a local Ray: at concurrency 1, then at concurrency 2, every
trial asking for 1 CPU (dispatch then gives it one torch thread). Printed: both wall times, the
throughput ratio (trials/s at 2 over trials/s at 1, i.e. wall at 1 / wall at 2; target at least
1.6) and the load average before and after each. The plan runs stages one after another, so the
single-trial stage `none` runs alone at either setting, as in the demo.
Run: .venv/bin/python benchmarks/concurrency.py
"""

from __future__ import annotations

from pathlib import Path

from _common import load_average, reduced_spec, run_study, setup_environment, workdir


def main() -> None:
    cache_dir = setup_environment()
    walls: dict[int, float] = {}
    loads: dict[int, tuple[str, str]] = {}
    n_trials = 0
    for concurrency in (1, 2):
        spec = reduced_spec(concurrency=concurrency)
        before = load_average()
        with workdir(f"concurrency{concurrency}") as folder:
            study = run_study(spec, cache_dir=cache_dir, workdir=Path(folder))
        loads[concurrency] = (before, load_average())
        walls[concurrency] = study.wall_s
        n_trials = sum(len(trials) for trials in study.trials.values())
        if study.failed:
            raise SystemExit(f"{study.failed} trial(s) failed at concurrency {concurrency}")

    print(f"workload: {n_trials} trials (stages none, ft_embed x 2, ft_gen x 2), 1 CPU each")
    for concurrency in (1, 2):
        before, after = loads[concurrency]
        print(
            f"concurrency {concurrency}: {walls[concurrency]:.1f} s "
            f"(load average before {before}; after {after})"
        )
    print(f"throughput ratio, concurrency 2 / 1: {walls[1] / walls[2]:.2f} (target >= 1.6)")


if __name__ == "__main__":
    main()
