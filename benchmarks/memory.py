"""Benchmark 7: peak memory of one demo trial for each method, and what bounds the RAG step's.

Each trial runs in a fresh Python process (`benchmarks/memory.py --child ...`), so no trial inherits
another's high-water mark. The demo spec runs with its batch sizes (8 for training, 16 for
evaluation) on 8 training questions (one training step per phase: later steps reuse the same
buffers and optimizer state) and 16 validation questions (one full evaluation batch), one torch
thread as under dispatch, learning rates from the demo grid (lr_embedder 2e-5, lr_generator 1e-3).
`independent` runs without reuse, so it trains both of its phases.

Printed:
1. per method, at the spec's precision: the child's peak resident set as the kernel reports it to
   the parent (`os.wait4`), the trial's own `peak_mem_mb`, its growth over the peak after loading
   both models, and the plan's forecast for the method's stage without reuse (trainers.memory);
2. the demo's `ft_gen` trial (RAG-Token, all 8 questions of a batch in one forward) in fp32, the
   precision of CPUs without native bf16: as before (no activation checkpointing, glibc's default
   allocator policy), with checkpointing alone, and as now (checkpointing and a fixed mmap
   threshold: `bound_allocator`), with the generator phase's peak and seconds per training step,
   and the ratios; then as now with the questions per forward chosen from
   `training.activation_memory_mb` (the default).
Run: .venv/bin/python benchmarks/memory.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from _common import load_average, reduced_spec, setup_environment

from trainers.config import METHODS

_OVERRIDES: dict[str, object] = {"data.n_train": 8, "data.n_validation": 16}
_RATES = {"lr_embedder": 2e-5, "lr_generator": 1e-3}


def _child(method: str, overrides: dict[str, object], unbounded_allocator: bool) -> None:
    """Run one trial in this process and print its metrics as JSON on the last line."""
    import torch

    import trainers.trial
    from search.spec import trial_config
    from trainers import run_trial
    from trainers.methods import trains

    cache_dir = setup_environment()
    torch.set_num_threads(1)  # as dispatch runs a trial of 1 CPU
    if unbounded_allocator:  # the code before bound_allocator existed
        trainers.trial.bound_allocator = lambda: None  # type: ignore[attr-defined]
    spec = reduced_spec(_OVERRIDES | overrides)
    trains_embedder, trains_generator = trains(method, spec.training)
    config = trial_config(
        spec,
        method,
        lr_embedder=_RATES["lr_embedder"] if trains_embedder else None,
        lr_generator=_RATES["lr_generator"] if trains_generator else None,
    )
    result = run_trial(config, cache_dir=cache_dir)
    print(json.dumps(result.metrics | {"losses": result.record["final_losses"]}))


def _measure(
    method: str, overrides: dict[str, object] | None = None, unbounded_allocator: bool = False
) -> tuple[float, dict]:
    """(peak RSS in MiB from the kernel's accounting of the child, the trial's metrics, with its
    phases' final losses under "losses")."""
    extra = ["--overrides", json.dumps(overrides or {})]
    if unbounded_allocator:
        extra.append("--unbounded-allocator")
    child = subprocess.Popen(
        [sys.executable, __file__, "--child", method, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # model-loading progress bars and warnings
        text=True,
    )
    assert child.stdout is not None
    output = child.stdout.read()
    # wait4 gives this child's own rusage; RUSAGE_CHILDREN would be the maximum over all children.
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"the {method} trial exited with {child.returncode}")
    metrics = json.loads(output.strip().splitlines()[-1])
    return usage.ru_maxrss / 1024, metrics  # KiB on Linux


def _forecast_mib(method: str) -> float:
    """The plan's forecast peak of a trial of ``method`` that trains every phase itself."""
    from search.forecast import method_memory

    forecast = method_memory(reduced_spec(_OVERRIDES), method)
    return forecast.host_bytes / 2**20 if forecast else float("nan")


def _step_s(metrics: dict, phase: str) -> float:
    return metrics[f"{phase}.wall_s"] / max(1, metrics[f"{phase}.steps"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--overrides", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--unbounded-allocator", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, json.loads(args.overrides), args.unbounded_allocator)
        return
    setup_environment()
    before = load_average()
    results = {method: _measure(method) for method in METHODS}
    whole_batch = {"training.precision": "fp32", "training.rag_questions_per_forward": 8}
    old = _measure(
        "ft_gen",
        whole_batch | {"training.gradient_checkpointing": False},
        unbounded_allocator=True,
    )
    checkpointed = _measure("ft_gen", whole_batch, unbounded_allocator=True)
    new = _measure("ft_gen", whole_batch)
    auto = _measure("ft_gen", {"training.precision": "fp32"})
    after = load_average()

    print(
        "workload: one trial per method, demo spec, 8 train / 16 validation questions, "
        "1 torch thread, each in a fresh process"
    )
    print(f"load average: before {before}; after {after}")
    precision = "bf16" if results["none"][1]["bf16"] else "fp32"
    print(f"1. per method, training.precision auto (here: {precision})")
    print("method        peak RSS (wait4)  trial peak_mem_mb  after load  growth  forecast")
    for method, (rss_mb, metrics) in results.items():
        loaded = metrics["load.peak_mem_mb"]
        print(
            f"{method:<13} {rss_mb:>11.0f} MiB {metrics['peak_mem_mb']:>13.0f} MiB "
            f"{loaded:>7.0f} MiB {metrics['peak_mem_mb'] - loaded:>6.0f} MiB "
            f"{_forecast_mib(method):>6.0f} MiB"
        )
    print("2. ft_gen (RAG-Token) in fp32, 8 questions (40 prompt rows) per forward")
    rows = (
        ("before: no checkpointing, default allocator", old),
        ("checkpointing, default allocator", checkpointed),
        ("now: checkpointing, bounded allocator", new),
        ("now, questions per forward from the budget", auto),
    )
    for label, (rss_mb, metrics) in rows:
        print(
            f"  {label:<44} peak RSS {rss_mb:>6.0f} MiB, generator phase peak "
            f"{metrics['generator.peak_mem_mb']:>6.0f} MiB, {_step_s(metrics, 'generator'):5.1f} s "
            f"per step, {metrics['generator.questions_per_forward'] or 8} per forward, loss "
            f"{metrics['losses']['generator']:.6f}"
        )
    step_s = {label: _step_s(metrics, "generator") for label, (_, metrics) in rows}
    print(
        f"  peak RSS now / before: {new[0] / old[0]:.2f}; seconds per step: checkpointing / "
        f"before {step_s[rows[1][0]] / step_s[rows[0][0]]:.2f}, bounded allocator / default "
        f"{step_s[rows[2][0]] / step_s[rows[1][0]]:.2f}, now / before "
        f"{step_s[rows[2][0]] / step_s[rows[0][0]]:.2f}"
    )


if __name__ == "__main__":
    main()
