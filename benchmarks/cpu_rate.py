"""Benchmark 13: the FLOP rate a time forecast assumes on this CPU against the rate trials reach.

`ragsweep plan` divides a trial's analytic FLOPs by a rate per CPU (search/throughput.py: by
precision, and in fp32 by whether the CPU has AVX-512) and adds a fixed overhead. This runs one
trial of each of the reduced demo's methods (none, ft_embed, ft_gen; 16 training and 16
validation questions) plus rag_token, back to back in fresh processes, `concurrency` of them at
once as a launch runs them (`--alone`: one), each with the spec's threads per trial
(`resources.cpus`) and an untimed warm-up trial first, no Ray; then, per trial:
the forecast wall seconds against the measured, and the trial's own FLOPs per CPU-second of its
training and evaluation phases against the rate the forecast assumes.
Run: .venv/bin/python benchmarks/cpu_rate.py [--precision auto|fp32|bf16] [--alone]
"""

from __future__ import annotations

import argparse

from _common import load_average, reduced_spec, run_plain_trials_side_by_side, setup_environment

from search.forecast import trial_seconds
from search.plan import grid_points, make_plan
from search.throughput import cpu_flops_per_cpu, throughput_text, trains_in_bf16

_METHODS = ["none", "ft_embed", "ft_gen", "rag_token"]
_OVERHEAD_PHASES = ("load", "index")  # the forecast's fixed overhead, not FLOPs at the rate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    parser.add_argument("--alone", action="store_true", help="one trial at a time")
    args = parser.parse_args()
    cache_dir = setup_environment()
    spec = reduced_spec(
        {
            "methods": _METHODS,
            "data.n_train": 16,
            "data.n_validation": 16,
            "training.precision": args.precision,
        }
    )
    stages = {stage.method: stage for stage in make_plan(spec).stages}
    embedder_rate = grid_points(stages["ft_embed"], spec)[0]
    generator_rate = grid_points(stages["ft_gen"], spec)[0]
    # rag_token's demo stage takes its rates from the two above; here it gets their first.
    rates = {
        "none": {},
        "ft_embed": embedder_rate,
        "ft_gen": generator_rate,
        "rag_token": embedder_rate | generator_rate,
    }
    trials = [(method, rates[method]) for method in _METHODS]
    load_before = load_average()
    metrics = run_plain_trials_side_by_side(
        spec,
        trials,
        cache_dir=cache_dir,
        threads=int(spec.resources.cpus),
        lanes=1 if args.alone else spec.concurrency,
        warm_up=True,
    )
    load_after = load_average()

    assumed = cpu_flops_per_cpu(trains_in_bf16(spec))
    print(f"rate assumed: {throughput_text(spec)}")
    print(
        f"{spec.resources.cpus:g} CPU per trial, {1 if args.alone else spec.concurrency} trial(s) "
        f"at once; load average: before {load_before}; after {load_after}"
    )
    forecast_total = measured_total = flops_total = cpu_total = 0.0
    for (method, trial_rates), trial in zip(trials, metrics, strict=True):
        forecast = trial_seconds(stages[method], spec) or 0.0
        flops, cpu_s = _work(trial, "flops"), _work(trial, "device_s")
        rate = flops / cpu_s if cpu_s else 0.0
        forecast_total, measured_total = forecast_total + forecast, measured_total + trial["wall_s"]
        flops_total, cpu_total = flops_total + flops, cpu_total + cpu_s
        print(
            f"{method} {trial_rates}: forecast {forecast:.0f} s, measured {trial['wall_s']:.0f} s "
            f"(measured / forecast {trial['wall_s'] / forecast:.2f}); "
            f"{rate:.2e} FLOP per CPU-s training + evaluating ({rate / assumed:.2f}x the assumed)"
        )
    rate = flops_total / cpu_total
    print(
        f"all {len(trials)} trials: measured / forecast wall {measured_total / forecast_total:.2f}; "
        f"reached rate / assumed rate {rate / assumed:.2f} ({rate:.2e} against {assumed:.2e})"
    )


def _work(metrics: dict[str, float], figure: str) -> float:
    """``figure`` summed over the trial's training and evaluation phases (``<phase>.<figure>``)."""
    return sum(
        value
        for key, value in metrics.items()
        if key.endswith(f".{figure}") and key.split(".")[0] not in _OVERHEAD_PHASES
    )


if __name__ == "__main__":
    main()
