"""The names of the figures a trial reports: what objectives, queries and tables may name.

Kept apart from the store so that the spec can check its objectives against them.
"""

from __future__ import annotations

__all__ = ["COST_METRICS", "HEADLINE_METRICS", "METRIC_NAMES", "QUALITY_METRICS", "TEST_METRICS"]

# The figures every trial reports (trainers.evaluate and trainers.cost), by kind.
# Validation quality, higher is better:
QUALITY_METRICS: tuple[str, ...] = ("em", "f1", "recall_at_k")
# The same on the held-out test split, with data.n_test: shown, never an objective (a search
# that picked on them would make them the selection's own figures).
TEST_METRICS: tuple[str, ...] = tuple(f"test_{name}" for name in QUALITY_METRICS)
# Cost; train_* count only the phases the trial trained itself. A trial also reports each
# phase's own figures as "<phase>.<figure>" (``generator.flops``).
COST_METRICS: tuple[str, ...] = (
    "train_flops",
    "train_wall_s",
    "train_device_s",
    "train_tokens",
    "flops",
    "wall_s",
    "device_s",
    "tokens",
    "peak_mem_mb",
)
# What `ragsweep train` shows first of one trial's figures (then each phase's own).
HEADLINE_METRICS: tuple[str, ...] = (
    *QUALITY_METRICS,
    *TEST_METRICS,
    "wall_s",
    "train_wall_s",
    "device_s",
    "tokens",
    "flops",
    "peak_mem_mb",
    "index_build_s",
    "index_cache_hit",
)
# --metric names users type -> the quality metric trials report.
METRIC_NAMES: dict[str, str] = {
    "f1": "f1",
    "em": "em",
    "recall": "recall_at_k",
    "recall_at_k": "recall_at_k",
}
