"""What ``compare``'s data can and cannot tell: which methods are indistinguishable from the
best and how many questions would decide, methods left without intervals, and the chosen runs'
held-out test scores."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from search.query.compare import MethodResult

__all__ = ["distinguishable", "held_out_notes", "interval_notes"]


def distinguishable(
    rows: Sequence[MethodResult], metric_key: str, best: str, *, resamples: int, seed: int
) -> Iterable[str]:
    """Which methods the data cannot tell from the best, and how many questions would."""
    if not any(r.intervals for r in rows if r.chosen is not None):
        yield (
            "how far apart these methods really are is unknown: their chosen runs have no "
            "per-question results (trials stored before ragsweep kept them), which intervals "
            "need; launch the spec again under a new name (launch --name NEW) to record them"
        )
        return
    paired = sorted(
        ((r, r.difference) for r in rows if r.difference is not None),
        key=lambda pair: -pair[1].interval.mean,  # closest to the best first
    )
    if not paired:
        return
    how = f"{resamples} bootstrap resamples, seed {seed}"
    questions = max(difference.interval.questions for _, difference in paired)
    close = [(r, difference) for r, difference in paired if not difference.distinguishable]
    if not close:
        yield (
            f"the data tells {best} apart from every other method on {metric_key}: each paired "
            f"95% interval of the difference excludes 0 ({questions} questions, {how})"
        )
        return
    needs = [
        f"{r.method} ({difference.interval.mean:+.3f}): about {r.questions_needed}"
        for r, difference in close
        if r.questions_needed is not None
    ]
    same = [r.method for r, _ in close if r.questions_needed is None]
    if same:
        needs.append(f"no difference observed for {', '.join(same)}")
    yield (
        f"the data cannot tell {best} apart from {', '.join(r.method for r, _ in close)} on "
        f"{metric_key}: their paired 95% intervals of the difference to {best} contain 0 "
        f"({questions} questions, {how}); validation questions a paired comparison would need "
        f"to tell each from {best} at the observed difference (95% two-sided, 80% power): "
        + "; ".join(needs)
    )


def held_out_notes(rows: Sequence[MethodResult], metric_key: str) -> Iterable[str]:
    """With a held-out test split (data.n_test): each chosen run's score there, which its
    selection on validation did not pick."""
    held_out = [
        f"{r.method} {r.chosen.metrics[f'test_{metric_key}']:.3f}"
        for r in rows
        if r.chosen is not None and f"test_{metric_key}" in r.chosen.metrics
    ]
    if held_out:
        yield (
            f"held-out test {metric_key} of each chosen run (data.n_test; picked on validation, "
            f"so not the selection's own figure): {', '.join(held_out)}"
        )


def interval_notes(rows: Sequence[MethodResult], best: str | None) -> Iterable[str]:
    """Methods left without intervals or without a paired difference, and why."""
    runs = [r for r in rows if r.chosen is not None]
    if not any(r.intervals for r in runs):
        return  # the advice says it for the whole table
    missing = [r.method for r in runs if not r.intervals]
    if missing:
        yield (
            f"no intervals for {', '.join(missing)}: their chosen runs have no per-question "
            "results (stored before ragsweep kept them)"
        )
    by_method = {r.method: r for r in runs}
    if best is not None and not by_method[best].intervals:
        yield (f"no paired differences: the best method's run ({best}) has no per-question results")
        return
    unpaired = [r.method for r in runs if r.intervals and r.method != best and r.difference is None]
    if unpaired:
        yield (
            f"no paired difference to {best} for {', '.join(unpaired)}: their runs were not "
            "scored on the same validation questions"
        )
