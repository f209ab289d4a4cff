"""Benchmark 7: peak memory of one demo trial for each method.

Each method's trial runs in a fresh Python process (`benchmarks/memory.py --child METHOD`), so no
trial inherits another's high-water mark. The demo spec runs with its batch sizes (8 for training,
16 for evaluation) on 8 training questions (one training step per phase: later steps reuse the
same buffers and optimizer state) and 16 validation questions (one full evaluation batch), one
torch thread as under dispatch, learning rates from the demo grid (lr_embedder 2e-5,
lr_generator 1e-3). `independent` runs without reuse, so it trains both of its phases. Printed per
method: the child's peak resident set as the kernel reports it to the parent (`os.wait4`), the
trial's own `peak_mem_mb` metric, and its growth over the peak after loading both models. Last,
the RAG-objective generator phase (ft_gen through RAG-Token) with all 8 questions of a batch in one
forward against `training.rag_questions_per_forward: 2` (gradient accumulation over 4 forwards of
2 questions): the peak during that phase, the ratio, and the two phases' losses (close, not equal:
bf16 rounding and dropout draws differ when a batch is split).
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
_PER_FORWARD = 2  # questions per generator forward in the accumulation run


def _child(method: str, per_forward: int | None) -> None:
    """Run one trial in this process and print its metrics as JSON on the last line."""
    import torch

    from search.spec import trial_config
    from trainers import run_trial
    from trainers.methods import trains

    cache_dir = setup_environment()
    torch.set_num_threads(1)  # as dispatch runs a trial of 1 CPU
    spec = reduced_spec(_OVERRIDES | {"training.rag_questions_per_forward": per_forward})
    trains_embedder, trains_generator = trains(method, spec.training)
    config = trial_config(
        spec,
        method,
        lr_embedder=_RATES["lr_embedder"] if trains_embedder else None,
        lr_generator=_RATES["lr_generator"] if trains_generator else None,
    )
    result = run_trial(config, cache_dir=cache_dir)
    print(json.dumps(result.metrics | {"losses": result.record["final_losses"]}))


def _measure(method: str, per_forward: int | None = None) -> tuple[float, dict]:
    """(peak RSS in MiB from the kernel's accounting of the child, the trial's metrics, with its
    phases' final losses under "losses")."""
    extra = ["--per-forward", str(per_forward)] if per_forward else []
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--per-forward", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.per_forward)
        return
    setup_environment()
    before = load_average()
    results = {method: _measure(method) for method in METHODS}
    accumulated = _measure("ft_gen", _PER_FORWARD)
    after = load_average()

    print(
        "workload: one trial per method, demo spec, 8 train / 16 validation questions, "
        "1 torch thread, each in a fresh process"
    )
    print(f"load average: before {before}; after {after}")
    print("method        peak RSS (wait4)  trial peak_mem_mb  after load  growth in trial")
    for method, (rss_mb, metrics) in results.items():
        loaded = metrics["load.peak_mem_mb"]
        print(
            f"{method:<13} {rss_mb:>11.0f} MiB {metrics['peak_mem_mb']:>13.0f} MiB "
            f"{loaded:>7.0f} MiB {metrics['peak_mem_mb'] - loaded:>11.0f} MiB"
        )
    whole, split = results["ft_gen"][1], accumulated[1]
    peak = "generator.peak_mem_mb"
    print(
        f"ft_gen generator phase, 8 questions per forward: peak {whole[peak]:.0f} MiB, loss "
        f"{whole['losses']['generator']:.6f}; {_PER_FORWARD} per forward: peak {split[peak]:.0f} "
        f"MiB, loss {split['losses']['generator']:.6f}; peak ratio {split[peak] / whole[peak]:.2f}"
    )


if __name__ == "__main__":
    main()
