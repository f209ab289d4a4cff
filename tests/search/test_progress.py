"""The launch's progress view as a log (not a terminal): one line per event, blocked stages,
and a remaining-time estimate that follows the schedule."""

from __future__ import annotations

import io
import re
import time
from pathlib import Path

from rich.console import Console

from search.launch.dispatch import StageEvent
from search.launch.progress import LaunchProgress
from search.plan import make_plan
from search.spec import load_spec

DEMO = load_spec(Path(__file__).resolve().parents[2] / "studies" / "demo.yaml")


def _remaining_minutes(line: str) -> float:
    return float(re.search(r"remaining ~([\d.]+) min", line).group(1))


def test_a_log_gets_a_line_per_event_and_the_estimate_follows_the_pace():
    plan = make_plan(DEMO)
    out = io.StringIO()
    console = Console(file=out, width=200, force_terminal=False)
    with LaunchProgress(plan, "f1", True, console) as progress:
        for stage in plan.stages:
            progress(StageEvent("stage", stage, n_trials=stage.n_trials))
        ft_gen = plan.stage("ft_gen")
        progress(StageEvent("trial_start", ft_gen))
        progress(StageEvent("trial_start", ft_gen))
        # One ft_gen trial ends 60 s after the first started, while the other runs: half of it
        # counts as done. The 10 minutes before them (encoding the index) set no pace.
        progress._started = time.perf_counter() - 660.0
        progress._first_trial = time.perf_counter() - 60.0
        progress(StageEvent("trial_end", ft_gen, objective=0.25))
        blocked = plan.stage("independent")
        progress(
            StageEvent("stage_end", blocked, blocked="stage 'ft_embed' has no completed trial")
        )
    lines = out.getvalue().splitlines()
    assert "stage ft_gen: running, 2 trials" in lines[2]
    trial_line = next(line for line in lines if "trial 1/2" in line)
    assert "f1 0.25 (best 0.25)" in trial_line
    per_trial = {stage.name: stage.trial_forecast_s for stage in plan.stages}
    total = sum(per_trial[stage.name] * stage.n_trials for stage in plan.stages)
    done = 1.5 * per_trial["ft_gen"]
    assert _remaining_minutes(trial_line) == round(60.0 * (total - done) / done / 60, 1)
    assert any("stage independent: blocked, stage 'ft_embed'" in line for line in lines)
    table = out.getvalue()[out.getvalue().index("ragsweep launch") :]
    assert re.search(r"independent\s+│\s+blocked", table)


def test_before_any_trial_ends_the_estimate_is_the_plan_forecast():
    plan = make_plan(DEMO)
    out = io.StringIO()
    with LaunchProgress(plan, "f1", True, Console(file=out, width=200)) as progress:
        assert progress._remaining() == f"remaining ~{plan.forecast_s / 60:.1f} min (forecast)"
