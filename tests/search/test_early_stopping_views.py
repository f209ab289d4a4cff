"""What the queries say of trials early stopping stopped: where each stopped, that they finished
and never win, and what stopping them saved, on a SQLite database written with Optuna itself."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import optuna
import pytest

from search.query.compare import compare
from search.query.report import best_of, load_study
from search.spec import load_spec
from search.store import TrialOutcome, open_database, open_stage_study, open_storage, trial_attrs
from tests.search.test_report import ragsweep

DEMO = Path(__file__).resolve().parents[2] / "studies" / "demo.yaml"
_RATE = optuna.distributions.FloatDistribution(1e-8, 1e-2, log=True)
_STATES = {"COMPLETE": optuna.trial.TrialState.COMPLETE, "PRUNED": optuna.trial.TrialState.PRUNED}

# (stage, state, learning rate, F1, training device s, evaluation device s). ft_gen/3 stopped at
# rung 1 with an F1 on record that would beat every completed trial: a stopped trial never wins.
_TRIALS = (
    ("ft_embed", "COMPLETE", 1e-5, 0.20, 6.0, 4.0),
    ("ft_embed", "COMPLETE", 2e-5, 0.25, 8.0, 6.0),
    ("ft_gen", "COMPLETE", 3e-4, 0.50, 100.0, 20.0),
    ("ft_gen", "COMPLETE", 1e-3, 0.30, 80.0, 20.0),
    ("ft_gen", "PRUNED", 3e-3, None, 30.0, None),
    ("ft_gen", "PRUNED", 1e-2, 0.99, 40.0, None),
)
# ft_gen's completed trials cost 120 and 100 s (mean 110); its two stopped ones 30 + 40 = 70 s,
# against 220 s run to the end: 150 s saved, of 24 + 290 + 150 = 464 s without early stopping.
_SAVED_S, _WOULD_TAKE_S = 150.0, 464.0


def _rung(number: int, value: float) -> dict[str, object]:
    return {
        "rung": number,
        "phase": "generator",
        "step": 2 * number,
        "steps": 8,
        "signal": "answer_logprob",
        "value": value,
        "questions": 8,
        "wall_s": 0.5,
    }


def _fill(url: str, name: str, trials=_TRIALS) -> None:
    """Stage studies of a launch with early stopping, as the launch writes them."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = load_spec(
        DEMO, {"name": name, "methods": ["ft_embed", "ft_gen"], "search.early_stopping": True}
    )
    storage = open_storage(url)
    for stage in ("ft_embed", "ft_gen"):
        study = open_stage_study(storage, spec, stage)
        rate_name = "lr_embedder" if stage == "ft_embed" else "lr_generator"
        for _, state, rate, f1, train_s, eval_s in (t for t in trials if t[0] == stage):
            pruned = state == "PRUNED"
            metrics = {"train_device_s": train_s, "device_s": train_s + (eval_s or 0.0)}
            if eval_s is not None:
                metrics["eval.device_s"] = eval_s
            if f1 is not None:
                metrics["f1"] = f1
            rungs = [_rung(1, -2.0)] if pruned else [_rung(1, -1.5), _rung(2, -1.2)]
            outcome = TrialOutcome(
                metrics=metrics,
                method=stage,
                stage=stage,
                record={"config": {rate_name: rate, "reuse": {}}, "rungs": rungs},
                node="n" * 8,
                pruned_at=rungs[-1] if pruned else None,
            )
            study.add_trial(
                optuna.trial.create_trial(
                    state=_STATES[state],
                    params={rate_name: rate},
                    distributions={rate_name: _RATE},
                    values=None if pruned else [f1],
                    intermediate_values={r["rung"]: r["value"] for r in rungs},
                    user_attrs=trial_attrs(outcome),
                )
            )


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[str, str]:
    url = f"sqlite:///{tmp_path_factory.mktemp('stopped') / 'studies.db'}"
    name = f"stopped-{uuid.uuid4().hex[:8]}"
    _fill(url, name)
    return name, url


def _json(*args: str):
    result = ragsweep(*args, "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_stopped_trials_count_as_finished_and_never_win(study):
    name, url = study
    report = load_study(open_database(url), name)
    assert report.finished("ft_gen") == 4
    assert best_of(report, "f1", "ft_gen").id == "ft_gen/0"
    comparison = compare(report)
    rows = {row.method: row for row in comparison.rows}
    assert rows["ft_gen"].chosen is not None and rows["ft_gen"].chosen.id == "ft_gen/0"
    assert dict(rows["ft_gen"].search_stages) == {"ft_gen": 4}
    # What the stopped trials did cost is part of the search's cost.
    assert rows["ft_gen"].search_device_s == pytest.approx(100 + 80 + 30 + 40)
    assert comparison.total_trials == 6


def test_compare_estimates_what_early_stopping_saved(study):
    name, url = study
    comparison = compare(load_study(open_database(url), name))
    [stopped] = comparison.early_stopped
    assert (stopped.stage, stopped.trials, stopped.pruned) == ("ft_gen", 4, 2)
    assert stopped.pruned_device_s == pytest.approx(70.0)
    assert stopped.full_device_s == pytest.approx(220.0)
    assert comparison.saved_device_s() == pytest.approx(_SAVED_S)
    assert comparison.work_device_s + _SAVED_S == pytest.approx(_WOULD_TAKE_S)

    rows = {row["method"]: row for row in _json("compare", name, "--storage", url)}
    assert rows["ft_gen"]["trial"] == "ft_gen/0" and rows["ft_gen"]["f1"] == 0.5
    assert (rows["ft_gen"]["pruned_trials"], rows["ft_embed"]["pruned_trials"]) == (2, 0)
    assert rows["ft_gen"]["saved_device_s"] == pytest.approx(_SAVED_S)
    assert rows["ft_embed"]["saved_device_s"] == 0.0

    for fmt in ("table", "markdown"):
        shown = ragsweep("compare", name, "--storage", url, "--format", fmt)
        assert shown.returncode == 0, shown.stderr
        text = " ".join(shown.stdout.split())
        assert "early stopping stopped 2 of 6 trials at a rung" in text
        assert f"saved about 2.5 min ({_SAVED_S / _WOULD_TAKE_S:.0%} of the 7.7 min" in text
        assert "stage ft_gen: 2 of 4 trials stopped early, costing 70.0 s" in text
        assert "stage ft_embed" not in text
        assert "saved by early stopping" in text  # the table's column


def test_a_stage_with_no_completed_trial_saved_an_unknown_amount(tmp_path):
    url, name = f"sqlite:///{tmp_path / 'studies.db'}", "all-stopped"
    _fill(url, name, [t for t in _TRIALS if t[0] == "ft_embed" or t[1] == "PRUNED"])
    comparison = compare(load_study(open_database(url), name))
    [stopped] = comparison.early_stopped
    assert stopped.full_device_s is None and stopped.saved_device_s is None
    assert comparison.saved_device_s() == 0.0
    assert next(r for r in comparison.rows if r.method == "ft_gen").chosen is None


def test_trials_show_where_each_stopped_trial_stopped(study):
    name, url = study
    pruned = _json("trials", name, "--storage", url, "--state", "pruned")
    assert [row["trial"] for row in pruned] == ["ft_gen/2", "ft_gen/3"]
    assert all(row["state"] == "pruned" and row["fail_reason"] is None for row in pruned)
    assert pruned[0]["pruned_at"] == _rung(1, -2.0)
    every = _json("trials", name, "--storage", url)
    assert [row["pruned_at"] is None for row in every] == [True] * 4 + [False] * 2

    csv = ragsweep("trials", name, "--storage", url, "--format", "csv")
    assert csv.returncode == 0 and "pruned_at" in csv.stdout.splitlines()[0]
    table = ragsweep("trials", name, "--storage", url)
    assert table.returncode == 0, table.stderr
    text = " ".join(table.stdout.split())
    assert "stopped early at" in text
    assert "rung 1: generator step 2/8, answer log-prob -2" in text

    listed = {row["study"]: row for row in _json("studies", "--storage", url)}
    assert (listed[name]["complete"], listed[name]["failed"], listed[name]["pruned"]) == (4, 0, 2)


def test_studies_without_early_stopping_show_no_column_for_it(tmp_path):
    url, name = f"sqlite:///{tmp_path / 'studies.db'}", "no-stopping"
    _fill(url, name, [t for t in _TRIALS if t[1] == "COMPLETE"])
    table = ragsweep("trials", name, "--storage", url)
    assert table.returncode == 0 and "stopped early" not in table.stdout
    shown = ragsweep("compare", name, "--storage", url)
    assert shown.returncode == 0 and "early stopping" not in shown.stdout
    assert "pruned_trials" not in _json("compare", name, "--storage", url)[0]
