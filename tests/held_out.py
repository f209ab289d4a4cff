"""What a launch's stored trials say about the held-out test split (``data.n_test``)."""

from __future__ import annotations

from collections.abc import Sequence

from search.store import TrialRecord, best_trial


def assert_leaders_scored_test(
    trials: Sequence[TrialRecord], metric: str, *, one_at_a_time: bool = False
) -> None:
    """A stage's completed trials scored the test split exactly when they led the stage on
    validation as they finished: its best did, one that did not trails it. Run
    ``one_at_a_time`` (concurrency 1, so trials finish in number order), exactly those at least
    as good as every earlier one did."""
    completed = sorted((t for t in trials if t.state == "COMPLETE"), key=lambda t: t.number)
    assert completed
    best = best_trial(completed, metric)
    assert best is not None and best.record["test_scored"] is True
    lead = float("-inf")
    for trial in completed:
        scored = trial.record["test_scored"]
        assert scored == (f"test_{metric}" in trial.metrics) == ("test.device_s" in trial.metrics)
        if not scored:
            assert trial.metrics[metric] < best.metrics[metric]
        if one_at_a_time:
            assert scored == (trial.metrics[metric] >= lead), trial.id
        lead = max(lead, trial.metrics[metric])
