"""How sure compare's and best's scores are: bootstrap intervals over the validation questions,
paired differences to the best method and the questions a paired comparison would need,
checked through the CLI against numpy over what ``ragsweep export --per-question`` writes.

The studies are written with Optuna itself, as a launch stores trials (per-question results
encoded with their hash in the record), so no training runs here.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import uuid
from pathlib import Path

import matplotlib.image
import numpy as np
import optuna
import pytest

from search.query.intervals import mean_interval, paired_difference, questions_needed
from search.spec import load_spec
from search.store import TrialOutcome, encode_questions, open_stage_study, open_storage, trial_attrs
from tests.search.test_cli import assert_one_line_error, ragsweep
from tests.search.test_store import fill_launch
from trainers import QuestionResult, questions_json

DEMO = Path(__file__).resolve().parents[2] / "studies" / "demo.yaml"
METHODS = ["none", "ft_embed", "ft_gen", "independent"]
_RATE = optuna.distributions.FloatDistribution(1e-8, 1e-2, log=True)
QUESTIONS = 60
# Every fourth question has no gold passages: its recall is None in every trial.
UNLABELLED = {i for i in range(QUESTIONS) if i % 4 == 3}
RESAMPLES, SEED = 2000, 0  # what the commands use unless told otherwise


def _answers(em: list[float], f1: list[float], recall: list[float]) -> list[QuestionResult]:
    return [
        QuestionResult(
            id=f"q{i}",
            prediction=f"answer {i} {em[i]:.0f}",
            em=em[i],
            f1=f1[i],
            recall=None if i in UNLABELLED else recall[i],
            retrieved=(f"d{i}", f"d{i + 1}", f"d{i + 2}"),
        )
        for i in range(QUESTIONS)
    ]


def _scenario() -> dict[str, list[list[QuestionResult]]]:
    """Method -> its trials' answers, the chosen (best) trial first: ft_gen is the best;
    independent answers exactly as ft_gen does; ft_embed differs from ft_gen on four questions
    (within noise); none is far below on most questions."""
    rng = np.random.default_rng(7)
    em = [float(x) for x in rng.random(QUESTIONS) < 0.6]
    partial = rng.random(QUESTIONS) * 0.6
    f1 = [1.0 if hit else round(float(x), 3) for hit, x in zip(em, partial, strict=True)]
    recall = [float(x) for x in rng.choice([0.0, 0.5, 1.0], QUESTIONS)]
    best = _answers(em, f1, recall)
    near_em, near_f1, near_recall = list(em), list(f1), list(recall)
    hits = [i for i in range(QUESTIONS) if em[i] == 1.0]
    misses = [i for i in range(QUESTIONS) if em[i] == 0.0]
    for i in hits[:3]:
        near_em[i], near_f1[i], near_recall[i] = 0.0, 0.25, 0.0
    near_em[misses[0]], near_f1[misses[0]] = 1.0, 1.0
    weak_f1 = [round(0.3 * x, 3) for x in rng.random(QUESTIONS)]
    zeros = [0.0] * QUESTIONS
    worst = _answers(zeros, zeros, zeros)  # a second, worse trial in each stage
    return {
        "none": [_answers(zeros, weak_f1, zeros), worst],
        "ft_embed": [_answers(near_em, near_f1, near_recall), worst],
        "ft_gen": [best, worst],
        "independent": [list(best)],
    }


def _fill(url: str, name: str, *, per_question: bool = True) -> None:
    """The scenario's stage studies as a launch writes them (ft_gen's last trial failed, with no
    per-question results); ``per_question=False`` stores the same trials as an older ragsweep
    did, without them."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = load_spec(DEMO, {"name": name, "methods": METHODS})
    storage = open_storage(url)
    for stage, runs in _scenario().items():
        study = open_stage_study(storage, spec, stage)
        for number, answers in enumerate(runs):
            rate = 10.0 ** -(3 + number)
            labelled = [a.recall for a in answers if a.recall is not None]
            metrics = {
                "em": float(np.mean([a.em for a in answers])),
                "f1": float(np.mean([a.f1 for a in answers])),
                "recall_at_k": float(np.mean(labelled)),
                "train_flops": 1e12 * (1 + METHODS.index(stage)),
                "train_device_s": 10.0 * (1 + number),
            }
            sha256 = hashlib.sha256(questions_json(answers).encode()).hexdigest()
            outcome = TrialOutcome(
                metrics=metrics,
                method=stage,
                stage=stage,
                record={
                    "config": {"lr_embedder": rate, "lr_generator": 1e-4, "reuse": {}},
                    "has_context_labels": True,
                    **({"questions_sha256": sha256} if per_question else {}),
                },
                node="n" * 8,
                per_question=encode_questions(answers) if per_question else None,
            )
            study.add_trial(
                optuna.trial.create_trial(
                    state=optuna.trial.TrialState.COMPLETE,
                    params={"lr_embedder": rate},
                    distributions={"lr_embedder": _RATE},
                    values=[metrics["f1"]],
                    user_attrs=trial_attrs(outcome),
                )
            )
        if stage == "ft_gen":
            failed = TrialOutcome(
                method=stage, stage=stage, fail_reason="diverged", retryable=False
            )
            study.add_trial(
                optuna.trial.create_trial(
                    state=optuna.trial.TrialState.FAIL,
                    params={"lr_embedder": 1e-2},
                    distributions={"lr_embedder": _RATE},
                    user_attrs=trial_attrs(failed),
                )
            )


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[str, str]:
    url = f"sqlite:///{tmp_path_factory.mktemp('intervals') / 'studies.db'}"
    name = f"sure-{uuid.uuid4().hex[:8]}"
    _fill(url, name)
    return name, url


def _run(*args: str, cache_dir: Path) -> str:
    result = ragsweep(*args, cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _compare(study: tuple[str, str], cache_dir: Path, *more: str) -> dict[str, dict]:
    name, url = study
    out = _run("compare", name, "--storage", url, "--format", "json", *more, cache_dir=cache_dir)
    return {row["method"]: row for row in json.loads(out)}


@pytest.fixture(scope="module")
def exported(study, tmp_path_factory, cache_dir) -> dict[str, list[dict[str, str]]]:
    """Trial -> its rows of the CSV ``export --per-question`` writes, in question order."""
    name, url = study
    out = tmp_path_factory.mktemp("export") / "questions.csv"
    _run("export", name, "--storage", url, "--per-question", "-o", str(out), cache_dir=cache_dir)
    by_trial: dict[str, list[dict[str, str]]] = {}
    for row in csv.DictReader(io.StringIO(out.read_text())):
        by_trial.setdefault(row["trial"], []).append(row)
    return by_trial


# --- the independent computation: numpy over the exported file ----------------------------------


def _column(rows: list[dict[str, str]], field: str) -> np.ndarray:
    return np.array([float(row[field]) if row[field] != "" else np.nan for row in rows])


def _numpy_interval(values: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED) -> list:
    """The percentile bootstrap as documented: indices from default_rng(seed), 2.5/97.5%."""
    values = values[~np.isnan(values)]
    indices = np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))
    low, high = np.percentile(values[indices].mean(axis=1), [2.5, 97.5])
    return [low, high]


def _paired(rows: list[dict[str, str]], reference: list[dict[str, str]], field: str) -> np.ndarray:
    """Per-question differences, matched by question id; questions without a score left out."""
    theirs = {row["question_id"]: row for row in reference}
    differences = [
        float(row[field]) - float(theirs[row["question_id"]][field])
        for row in rows
        if row[field] != "" and theirs[row["question_id"]][field] != ""
    ]
    return np.array(differences)


# --- tests ----------------------------------------------------------------------------------------


def test_export_per_question_writes_one_row_per_trial_and_question(study, tmp_path, cache_dir):
    name, url = study
    out = tmp_path / "questions.json"
    printed = _run(
        "export", name, "--storage", url, "--per-question", "-o", str(out), cache_dir=cache_dir
    )
    rows = json.loads(out.read_text())
    # Every completed trial (7), none of the failed one; 60 questions each.
    assert len(rows) == 7 * QUESTIONS and f"wrote {len(rows)} answers" in printed
    assert "ft_gen/2" not in {row["trial"] for row in rows}
    first = rows[0]
    assert set(first) == {
        "stage",
        "trial",
        "method",
        "lr_embedder",
        "lr_generator",
        "question_id",
        "prediction",
        "em",
        "f1",
        "recall",
        "retrieved",
    }
    assert (first["trial"], first["stage"], first["question_id"]) == ("none/0", "none", "q0")
    assert first["lr_embedder"] == 1e-3 and first["retrieved"] == ["d0", "d1", "d2"]
    assert rows[3]["recall"] is None  # q3 has no gold passages
    csv_out = tmp_path / "questions.csv"
    _run(
        "export", name, "--storage", url, "--per-question", "-o", str(csv_out), cache_dir=cache_dir
    )
    flat = list(csv.DictReader(io.StringIO(csv_out.read_text())))
    assert len(flat) == len(rows)
    assert flat[0]["retrieved"] == "d0;d1;d2" and flat[3]["recall"] == ""
    assert [float(row["f1"]) for row in flat] == [row["f1"] for row in rows]


def test_compare_intervals_and_paired_differences_match_numpy_over_the_export(
    study, exported, cache_dir
):
    rows = _compare(study, cache_dir)
    assert {row["best_method"] for row in rows.values()} == {"ft_gen"}
    reference = exported[rows["ft_gen"]["trial"]]
    for method, row in rows.items():
        mine = exported[row["trial"]]
        assert row["questions"] == QUESTIONS and (row["resamples"], row["seed"]) == (2000, 0)
        for metric, field in (("em", "em"), ("f1", "f1"), ("recall_at_k", "recall")):
            assert row[f"{metric}_95"] == pytest.approx(
                _numpy_interval(_column(mine, field)), abs=1e-12
            )
        if method == "ft_gen":
            assert row["vs_best"] is None and row["verdict"] == "best (reference)"
            continue
        differences = _paired(mine, reference, "f1")
        assert row["vs_best"] == pytest.approx(differences.mean(), abs=1e-12)
        assert row["vs_best_95"] == pytest.approx(_numpy_interval(differences), abs=1e-12)
    # Recall@k rests on the labelled questions only.
    assert len(_column(reference, "recall")[~np.isnan(_column(reference, "recall"))]) == 45


def test_the_same_seed_gives_the_same_intervals(study, cache_dir):
    first, again = _compare(study, cache_dir), _compare(study, cache_dir)
    assert first == again
    other = _compare(study, cache_dir, "--seed", "1", "--resamples", "500")
    assert other["ft_gen"]["seed"] == 1 and other["ft_gen"]["resamples"] == 500
    assert other["none"]["f1_95"] != first["none"]["f1_95"]  # the seed is used
    assert other["none"]["f1"] == first["none"]["f1"]  # the point values are not resampled


def test_identical_answers_differ_by_exactly_zero_and_are_not_distinguishable(study, cache_dir):
    rows = _compare(study, cache_dir)
    same = rows["independent"]
    assert same["vs_best"] == 0.0 and same["vs_best_95"] == [0.0, 0.0]
    assert same["verdict"] == "not distinguishable from the best (no difference observed)"
    assert same["questions_needed"] is None
    name, url = study
    table = _run("compare", name, "--storage", url, "--format", "markdown", cache_dir=cache_dir)
    [line] = [line for line in table.splitlines() if line.startswith("| independent | indep")]
    assert "| +0.000 | [+0.000, +0.000] | not distinguishable from the best" in line
    assert "percentile bootstrap, 2000 resamples, seed 0" in table
    advice = " ".join(table.split())  # rich wraps long lines
    assert "the data cannot tell ft_gen apart from" in advice
    assert "no difference observed for independent" in advice
    assert "the same f1 on every question" in advice  # independent, the paper's pick


def test_a_clearly_worse_method_is_distinguishable(study, cache_dir):
    rows = _compare(study, cache_dir)
    assert rows["none"]["verdict"] == "distinguishable from the best"
    assert rows["none"]["vs_best_95"][1] < 0
    assert rows["ft_embed"]["verdict"] == "not distinguishable from the best"
    low, high = rows["ft_embed"]["vs_best_95"]
    assert low < 0 < high


def test_questions_needed_follows_the_power_formula(study, exported, cache_dir):
    rows = _compare(study, cache_dir)
    near = rows["ft_embed"]
    differences = _paired(exported[near["trial"]], exported[rows["ft_gen"]["trial"]], "f1")
    expected = math.ceil(((1.96 + 0.84) * differences.std(ddof=1) / abs(differences.mean())) ** 2)
    assert near["questions_needed"] == expected > QUESTIONS  # more than the study has
    name, url = study
    table = _run("compare", name, "--storage", url, "--format", "markdown", cache_dir=cache_dir)
    assert f"ft_embed ({near['vs_best']:+.3f}): about {expected}" in " ".join(table.split())


def test_interval_functions_on_known_numbers():
    identical = paired_difference([0.2, 0.5, 1.0], [0.2, 0.5, 1.0])
    assert identical is not None
    assert (identical.interval.low, identical.interval.high, identical.sd) == (0.0, 0.0, 0.0)
    assert questions_needed(identical) is None
    # Differences 0.1, 0.3: mean 0.2, sd 0.1414...: ceil((2.8 * 0.1414 / 0.2)^2) = ceil(3.92).
    shifted = paired_difference([0.3, 0.8], [0.2, 0.5])
    assert shifted is not None and questions_needed(shifted) == 4
    # Questions without a score (None) are left out; in a pair, where either has none.
    interval = mean_interval([1.0, None, 0.0, None])
    assert interval is not None and interval.questions == 2 and interval.mean == 0.5
    pair = paired_difference([1.0, None, 0.5], [0.0, 1.0, None])
    assert pair is not None and pair.interval.questions == 1 and pair.interval.mean == 1.0
    assert mean_interval([None, None]) is None


def test_best_shows_the_intervals_of_its_scores(study, exported, cache_dir):
    name, url = study
    best = json.loads(_run("best", name, "--storage", url, "--format", "json", cache_dir=cache_dir))
    assert best["trial"] == "ft_gen/0"
    mine = exported["ft_gen/0"]
    intervals = best["intervals_95"]
    assert intervals["f1"] == pytest.approx(_numpy_interval(_column(mine, "f1")), abs=1e-12)
    assert intervals["recall_at_k"] == pytest.approx(
        _numpy_interval(_column(mine, "recall")), abs=1e-12
    )
    assert (intervals["questions"], intervals["resamples"], intervals["seed"]) == (60, 2000, 0)
    table = _run("best", name, "--storage", url, cache_dir=cache_dir)
    low, high = intervals["f1"]
    assert f"[{low:.3f}, {high:.3f}]" in table and "2000 resamples, seed 0" in table


def test_a_study_without_per_question_results_compares_as_before_and_says_so(tmp_path, cache_dir):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    fill_launch(url, "old")
    rows = _compare(("old", url), cache_dir)
    assert all(row["questions"] is None and row["f1_95"] is None for row in rows.values())
    assert rows["two_phase"]["f1"] == pytest.approx(0.2)  # the point values, as before
    table = _run("compare", "old", "--storage", url, cache_dir=cache_dir)
    assert "methods at their best validation run" in table and "95% intervals" not in table
    assert "no per-question results" in " ".join(table.split())
    best = _run("best", "old", "--storage", url, cache_dir=cache_dir)
    assert "no per-question results" in " ".join(best.split())
    assert_one_line_error(
        ragsweep(
            "export",
            "old",
            "--storage",
            url,
            "--per-question",
            "-o",
            str(tmp_path / "q.csv"),
            cache_dir=cache_dir,
        ),
        "no trial of study 'old' has per-question results",
    )
    assert not (tmp_path / "q.csv").exists()


def test_plot_draws_the_chosen_runs_intervals(tmp_path, cache_dir):
    # The same trials, once with per-question results and once without (an older study): the
    # pictures differ by the error bars and their legend entry alone.
    pictures = []
    for per_question in (True, False):
        url = f"sqlite:///{tmp_path / f'{per_question}.db'}"
        _fill(url, "sure", per_question=per_question)
        picture = tmp_path / f"{per_question}.png"
        _run("plot", "sure", "--storage", url, "-o", str(picture), cache_dir=cache_dir)
        pictures.append(matplotlib.image.imread(picture))
    with_bars, without = pictures
    assert with_bars.shape == without.shape
    assert np.abs(with_bars - without).sum() > 0
