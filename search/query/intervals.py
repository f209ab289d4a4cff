"""How sure a study's scores are: bootstrap intervals over validation questions, paired
differences between two trials scored on the same questions, and the questions a paired
comparison would need to decide.

Every interval is a percentile bootstrap (Efron & Tibshirani, *An Introduction to the Bootstrap*,
1993, ch. 13): ``resamples`` draws of the questions with replacement, from a fresh
``numpy.random.default_rng(seed)`` per interval (``integers(0, n, size=(resamples, n))``), and
the 2.5th and 97.5th percentiles (numpy's default, linear) of the resampled means. A paired
difference draws the question indices once per resample and applies them to both trials, so
what the two share (easy and hard questions) cancels. Recall@k counts only questions with
context labels (recall not None), in both trials for a paired difference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from search.metrics import QUALITY_METRICS
from trainers import QuestionResult

__all__ = [
    "CONFIDENCE",
    "RESAMPLES",
    "SEED",
    "Interval",
    "PairedDifference",
    "mean_interval",
    "metric_intervals",
    "paired_difference",
    "question_scores",
    "questions_needed",
]

RESAMPLES = 2000  # percentiles of 2000 resampled means move by well under 0.01 between seeds
SEED = 0  # fixed: the same study gives the same intervals every time it is read
CONFIDENCE = 0.95
# Two-sided 95% and 80% power (normal quantiles): n = ((z_a + z_b) * sd / |mean|)^2.
_Z_ALPHA, _Z_POWER = 1.96, 0.84
_BLOCK = 1_000_000  # question indices drawn at once


@dataclass(frozen=True)
class Interval:
    """A mean over questions and its 95% percentile-bootstrap interval."""

    mean: float
    low: float
    high: float
    questions: int  # the questions it rests on (for Recall@k: those with context labels)

    @property
    def bounds(self) -> list[float]:
        """[low, high], as the JSON and CSV outputs write it."""
        return [self.low, self.high]

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


@dataclass(frozen=True)
class PairedDifference:
    """One trial's score minus a reference trial's, question by question, with its interval."""

    interval: Interval  # of the mean of per-question differences
    sd: float  # the per-question differences' sample standard deviation (ddof 1)

    @property
    def distinguishable(self) -> bool:
        """Whether the interval excludes 0: the data tells the two trials apart."""
        return not self.interval.contains(0.0)


def question_scores(questions: Sequence[QuestionResult], metric: str) -> list[float | None]:
    """Each question's score on ``metric`` (em, f1 or recall_at_k, as trials report them), in
    the questions' order; None where a question has no score (Recall@k without labels)."""
    if metric == "em":
        return [question.em for question in questions]
    if metric == "f1":
        return [question.f1 for question in questions]
    if metric == "recall_at_k":
        return [question.recall for question in questions]
    raise ValueError(f"metric '{metric}' has no per-question score; use em, f1 or recall_at_k")


def mean_interval(
    scores: Sequence[float | None], *, resamples: int = RESAMPLES, seed: int = SEED
) -> Interval | None:
    """The mean of ``scores`` and its 95% bootstrap interval; None scores are left out, and
    None is returned when no score is left."""
    values = np.array([score for score in scores if score is not None], dtype=np.float64)
    if values.size == 0:
        return None
    return _bootstrap(values, resamples=resamples, seed=seed)


def metric_intervals(
    questions: Sequence[QuestionResult] | None, *, resamples: int = RESAMPLES, seed: int = SEED
) -> dict[str, Interval]:
    """A trial's interval of each quality metric (em, f1, recall_at_k) over its questions;
    Recall@k absent when no question has context labels, {} without per-question results."""
    if questions is None:
        return {}
    intervals = {}
    for metric in QUALITY_METRICS:
        interval = mean_interval(question_scores(questions, metric), resamples=resamples, seed=seed)
        if interval is not None:
            intervals[metric] = interval
    return intervals


def paired_difference(
    scores: Sequence[float | None],
    reference: Sequence[float | None],
    *,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> PairedDifference | None:
    """``scores`` minus ``reference`` (the same questions in the same order), with the paired
    bootstrap interval of its mean; questions where either has no score are left out, and None
    is returned when none is left."""
    if len(scores) != len(reference):
        raise ValueError(
            f"a paired difference needs the same questions: {len(scores)} scores against "
            f"{len(reference)}"
        )
    differences = np.array(
        [a - b for a, b in zip(scores, reference, strict=True) if a is not None and b is not None],
        dtype=np.float64,
    )
    if differences.size == 0:
        return None
    # Resampling the differences is resampling question indices and applying them to both.
    interval = _bootstrap(differences, resamples=resamples, seed=seed)
    sd = float(differences.std(ddof=1)) if differences.size > 1 else 0.0
    return PairedDifference(interval=interval, sd=sd)


def questions_needed(difference: PairedDifference) -> int | None:
    """Validation questions a paired comparison needs to tell the observed mean difference from
    0 (95% two-sided, 80% power), at the observed spread of per-question differences:
    ``ceil(((1.96 + 0.84) * sd / |mean|)^2)``, at least 2. None: no difference observed (a mean
    difference of 0 takes any number of questions)."""
    mean = difference.interval.mean
    if mean == 0.0:
        return None
    return max(2, math.ceil(((_Z_ALPHA + _Z_POWER) * difference.sd / abs(mean)) ** 2))


def _bootstrap(values: np.ndarray, *, resamples: int, seed: int) -> Interval:
    """``values``' mean and the percentile-bootstrap interval of it."""
    # values: (n,), one per question
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, not {resamples}")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)  # (resamples,)
    # Drawn in blocks of about a million indices, so a large validation set does not take
    # gigabytes; successive draws continue one stream, so the blocks give what one draw would.
    block = max(1, _BLOCK // values.size)
    for start in range(0, resamples, block):
        rows = min(block, resamples - start)
        indices = rng.integers(0, values.size, size=(rows, values.size))  # (rows, n)
        means[start : start + rows] = values[indices].mean(axis=1)
    tail = 100.0 * (1.0 - CONFIDENCE) / 2.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return Interval(
        mean=float(values.mean()), low=float(low), high=float(high), questions=int(values.size)
    )
