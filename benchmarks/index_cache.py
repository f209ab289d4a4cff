"""Benchmark 3: trials sharing the cached frozen index against trials that re-encode the corpus.

The reduced demo workload (benchmarks/_common.py: none, ft_embed x 2 rates, ft_gen x 2 rates on
16 training and 16 validation questions; the full demo corpus of 1,470 passages) is launched twice
through `search.launch.dispatch.launch` at the demo's concurrency 2, each into a fresh SQLite database:
once as the service runs it (every trial reads the document vectors cached under RAGSWEEP_CACHE),
once with `training.index_cache: false` (every trial encodes the corpus with MiniLM itself).
Printed: the trials' summed wall time, mean index seconds per trial (the trial's own `index.wall_s`) for each, their ratio, the
whole study's wall-time ratio, and the load average before and after each study.
Run: .venv/bin/python benchmarks/index_cache.py
"""

from __future__ import annotations

from pathlib import Path
from statistics import mean

from _common import (
    STUDY_OVERRIDES,
    load_average,
    reduced_spec,
    run_study,
    setup_environment,
    workdir,
)


def main() -> None:
    cache_dir = setup_environment()
    walls: dict[bool, float] = {}
    index_s: dict[bool, float] = {}
    trial_s: dict[bool, float] = {}  # sum of the trials' own wall_s
    # ... less their index time: equal on an idle machine, so it shows load that hit one side.
    outside_index_s: dict[bool, float] = {}
    loads: dict[bool, tuple[str, str]] = {}
    for cached in (True, False):
        spec = reduced_spec({**STUDY_OVERRIDES, "training.index_cache": cached})
        before = load_average()
        with workdir("index") as folder:
            study = run_study(spec, cache_dir=cache_dir, workdir=Path(folder))
        loads[cached] = (before, load_average())
        if study.failed:
            raise SystemExit(f"{study.failed} trial(s) failed (index_cache={cached})")
        trials = [metrics for stage in study.trials.values() for metrics in stage]
        hits = {bool(metrics["index_cache_hit"]) for metrics in trials}
        if hits != {cached}:
            raise SystemExit(f"index_cache={cached} but the trials' cache hits were {hits}")
        walls[cached] = study.wall_s
        index_s[cached] = mean(metrics["index.wall_s"] for metrics in trials)
        trial_s[cached] = sum(metrics["wall_s"] for metrics in trials)
        outside_index_s[cached] = trial_s[cached] - sum(m["index.wall_s"] for m in trials)

    print(
        f"workload: {len(trials)} trials (none, ft_embed x 2, ft_gen x 2), concurrency 2, 1 CPU each"
    )
    for cached, label in ((True, "cached index"), (False, "re-encoded per trial")):
        before, after = loads[cached]
        print(
            f"{label}: study {walls[cached]:.1f} s, trials {trial_s[cached]:.1f} s in all, "
            f"index {index_s[cached]:.2f} s per trial "
            f"(load average before {before}; after {after})"
        )
    print(
        f"index seconds per trial, re-encoded / cached: {index_s[False] / index_s[True]:.0f}x "
        f"({index_s[False]:.1f} s against {index_s[True]:.2f} s)"
    )
    print(
        f"trial time outside the index, re-encoded / cached: "
        f"{outside_index_s[False] / outside_index_s[True]:.2f} "
        "(1.0 on an idle machine: the trials differ only in the index)"
    )
    print(f"study wall time, re-encoded / cached: {walls[False] / walls[True]:.2f}")


if __name__ == "__main__":
    main()
