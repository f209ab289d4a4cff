"""Benchmark 4: the separable search plan against the Cartesian grid, for two_phase.

Same small grid for both: the demo's (lr_embedder in {5e-6, 2e-5}, lr_generator in {3e-4, 1e-3}),
the demo spec with only two_phase, 16 training questions (two steps of the demo's batch of 8 per
phase) and 16 validation questions.
- separable: the service's plan, launched through `search.launch.dispatch.launch` (concurrency 2, 1 CPU
  per trial, fresh SQLite): ft_gen (= two_phase's phase 1) searches lr_generator (m trials), then
  two_phase searches lr_embedder (n trials) on the best phase-1 checkpoint; n + m trials.
- Cartesian: every (lr_embedder, lr_generator) pair as a complete two_phase trial, both phases
  trained; n x m trials in two fresh processes at once with one thread each (as concurrency 2 with
  1 CPU per trial); best by validation F1, ties to the first pair in grid order (the service's
  rule: the earliest trial).
Printed: trials, compute spent (the trials' own analytic FLOPs and CPU-seconds, loading and
evaluation included), both picks and whether they agree, the plan's counts on the paper's 9-value
grid (from `make_plan`, not run), and the load average before and after each side.
Run: .venv/bin/python benchmarks/search_plan.py
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

from _common import (
    load_average,
    reduced_spec,
    run_plain_trials_side_by_side,
    run_study,
    setup_environment,
    workdir,
)

from search.plan import make_plan
from search.spec import PAPER_GRID

_OVERRIDES: dict[str, object] = {
    "methods": ["two_phase"],
    "data.n_train": 16,
    "data.n_validation": 16,
}


def _cartesian_best(
    points: list[dict[str, float]], metrics: list[dict[str, float]]
) -> tuple[dict[str, float], bool]:
    """The point with the best F1 (first in grid order on a tie) and whether a tie decided it."""
    scores = [trial["f1"] for trial in metrics]
    best = max(range(len(points)), key=lambda i: (scores[i], -i))
    return points[best], scores.count(scores[best]) > 1


def main() -> None:
    cache_dir = setup_environment()
    spec = reduced_spec(_OVERRIDES)
    search = spec.search

    before_separable = load_average()
    with workdir("plan") as folder:
        separable = run_study(spec, cache_dir=cache_dir, workdir=Path(folder))
    before_cartesian = load_average()
    if separable.failed:
        raise SystemExit(f"{separable.failed} trial(s) of the separable plan failed")
    points = [
        {"lr_embedder": lr_e, "lr_generator": lr_g}
        for lr_e, lr_g in itertools.product(search.lr_embedder, search.lr_generator)
    ]
    start = time.perf_counter()
    cartesian = run_plain_trials_side_by_side(  # in grid order
        spec, [("two_phase", p) for p in points], cache_dir=cache_dir, threads=1, lanes=2
    )
    cartesian_s = time.perf_counter() - start
    after = load_average()

    separable_trials = [m for stage in separable.trials.values() for m in stage]
    separable_pick = separable.best_rates["two_phase"]
    cartesian_pick, tied = _cartesian_best(points, cartesian)
    ft_gen_f1 = [round(m["f1"], 3) for m in separable.trials["ft_gen"]]
    two_phase_f1 = [round(m["f1"], 3) for m in separable.trials["two_phase"]]
    paper = make_plan(
        spec.model_copy(
            update={
                "search": search.model_copy(
                    update={"lr_embedder": list(PAPER_GRID), "lr_generator": list(PAPER_GRID)}
                )
            }
        )
    ).search_cost("two_phase")

    print(
        f"workload: two_phase on the grid lr_embedder {search.lr_embedder} x lr_generator "
        f"{search.lr_generator}; {spec.data.n_train} train / {spec.data.n_validation} validation questions"
    )
    print(
        f"load average: before separable {before_separable}; before Cartesian {before_cartesian}; "
        f"after {after}"
    )
    print(
        f"separable F1: ft_gen {ft_gen_f1}, two_phase {two_phase_f1}; study {separable.wall_s:.0f} s"
    )
    print(
        f"Cartesian F1 {[round(m['f1'], 3) for m in cartesian]} over {points}; "
        f"{cartesian_s:.0f} s in two processes"
    )
    print(
        f"paper grid (plan only, not run): separable {paper['trials']} trials, Cartesian {paper['cartesian_trials']}"
    )
    flops = (sum(m["flops"] for m in separable_trials), sum(m["flops"] for m in cartesian))
    cpu_s = (sum(m["device_s"] for m in separable_trials), sum(m["device_s"] for m in cartesian))
    print(f"trials: separable {len(separable_trials)}, Cartesian {len(cartesian)}")
    print(
        f"compute, Cartesian / separable: FLOPs {flops[1] / flops[0]:.2f} "
        f"({flops[1]:.2e} / {flops[0]:.2e}), CPU-seconds {cpu_s[1] / cpu_s[0]:.2f} "
        f"({cpu_s[1]:.0f} / {cpu_s[0]:.0f})"
    )
    print(
        f"picked: separable {separable_pick}, Cartesian {cartesian_pick}"
        f"{' (decided by a tie in F1)' if tied else ''}; same: {separable_pick == cartesian_pick}"
    )


if __name__ == "__main__":
    main()
