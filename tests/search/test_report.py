"""The query commands on a launched study, through the CLI in a subprocess, on SQLite and PostgreSQL.

The study is studies/demo.yaml itself with tiny models and data (the same methods, grids, stages
and reuse), plus one diverging learning rate so that a failed trial is there to be reported.
Expected values are computed from the database with Optuna's own API, not written down.
"""

from __future__ import annotations

import csv
import io
import json
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import matplotlib.image
import optuna
import pytest

from search.launch.dispatch import launch
from search.spec import load_spec
from search.store import open_storage
from tests.cli import ragsweep as run_ragsweep
from tests.search.test_cli import assert_one_line_error
from tests.search.test_store import fill_launch
from tests.storage import storage_url_for
from tests.tiny import TINY_DATA, TINY_TRAINING

DEMO = Path(__file__).resolve().parents[2] / "studies" / "demo.yaml"

# Under xdist, one worker runs this module: its tests share each backend's launched ``study`` and
# compare the two backends' answers.
pytestmark = pytest.mark.xdist_group("test_report")


def demo_spec(name: str, **changes: object):
    """studies/demo.yaml with tiny models and data; ``changes`` are more dotted overrides."""
    overrides: dict[str, object] = {
        "name": name,
        "models.embedder": "tiny",
        "models.generator": "tiny",
        "data.n_train": TINY_DATA.n_train,
        "data.n_validation": TINY_DATA.n_validation,
        "data.generated.n_entities": TINY_DATA.generated.n_entities,
        "training.batch_size_embedder": TINY_TRAINING.batch_size_embedder,
        "training.batch_size_generator": TINY_TRAINING.batch_size_generator,
        "training.k": TINY_TRAINING.k,
        "training.max_doc_tokens": TINY_TRAINING.max_doc_tokens,
        "training.max_new_tokens": TINY_TRAINING.max_new_tokens,
        "training.precision": "fp32",
        # 1e30 diverges: ft_gen/1 fails with its reason, and the study goes on.
        "search.lr_generator": [1e-3, 1e30],
        "search.lr_embedder": [1e-4, 1e-3],
    }
    return load_spec(DEMO, overrides | changes)


@pytest.fixture(scope="module")
def launched(tmp_path_factory, cache_dir):
    """(study name, SQLite URL): the tiny demo and a joint Cartesian study, in one database."""
    tmp_path = tmp_path_factory.mktemp("report")
    url = storage_url_for("sqlite", tmp_path)
    name = f"demo-{uuid.uuid4().hex[:8]}"  # unique: a PostgreSQL database outlives test sessions
    for spec in (
        demo_spec(name),
        demo_spec(
            f"{name}-joint",
            methods=["rag_token"],
            **{"search.joint": "cartesian", "search.lr_generator": [1e-3, 3e-3]},
        ),
    ):
        launch(spec, storage_url=url, runs_dir=tmp_path / "runs", cache_dir=cache_dir)
    return name, url


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def study(request, tmp_path_factory, launched):
    """(study name, storage URL) of the launched studies, on each backend.

    PostgreSQL gets the SQLite launch's studies copied with Optuna's own ``copy_study``: what
    this module tests is the queries on each backend (SQLite's are read without Optuna); a launch
    writing to PostgreSQL is test_dispatch's and test_faults'.
    """
    name, sqlite_url = launched
    if request.param == "sqlite":
        return launched
    url = storage_url_for("postgresql", tmp_path_factory.mktemp("report-postgresql"))
    source, target = open_storage(sqlite_url), open_storage(url)
    for study_name in optuna.get_all_study_names(source):  # in the order they were created
        optuna.copy_study(from_study_name=study_name, from_storage=source, to_storage=target)
    return name, url


def ragsweep(*args: str) -> subprocess.CompletedProcess[str]:
    return run_ragsweep(*args, env={"COLUMNS": "200"})  # in this process (tests.cli)


def query_json(*args: str):
    result = ragsweep(*args, "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def optuna_trials(url: str, name: str) -> dict[str, optuna.trial.FrozenTrial]:
    """Every trial of the launch, by <stage>/<number>, read with Optuna's API."""
    storage = open_storage(url)
    trials = {}
    for study_name in optuna.get_all_study_names(storage):
        group, _, stage = study_name.partition("/")
        if group == name:
            for trial in optuna.load_study(study_name=study_name, storage=storage).trials:
                trials[f"{stage}/{trial.number}"] = trial
    return trials


def test_studies_lists_each_launch_with_states_best_score_and_compute(study):
    name, url = study
    listed = {row["study"]: row for row in query_json("studies", "--storage", url)}
    trials = optuna_trials(url, name).values()
    row = listed[name]
    assert row["methods"].split(",") == load_spec(DEMO).methods
    assert (row["complete"], row["failed"], row["running"]) == (9, 1, 0)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert row["objective"] == "f1"
    assert row["best"] == max(t.user_attrs["metrics"]["f1"] for t in complete)
    assert row["train_flops"] == pytest.approx(
        sum(t.user_attrs.get("metrics", {}).get("train_flops", 0) for t in trials)
    )
    assert listed[f"{name}-joint"]["complete"] == 4


def test_trials_shows_rates_metrics_cost_and_failure_reasons(study):
    name, url = study
    expected = optuna_trials(url, name)
    rows = query_json("trials", name, "--storage", url)
    assert {row["trial"] for row in rows} == set(expected)
    for row in rows:
        trial = expected[row["trial"]]
        metrics = trial.user_attrs.get("metrics", {})
        assert row["f1"] == metrics.get("f1") and row["recall_at_k"] == metrics.get("recall_at_k")
        assert row["train_flops"] == metrics.get("train_flops")
        assert row["lr_generator"] == trial.params.get(
            "lr_generator", trial.user_attrs.get("record", {}).get("config", {}).get("lr_generator")
        )
    [failed] = query_json("trials", name, "--storage", url, "--state", "fail")
    assert failed["trial"] == "ft_gen/1" and "diverged" in failed["fail_reason"]
    assert failed["lr_generator"] == 1e30


def test_trials_filters_by_method_and_sorts_best_first(study):
    name, url = study
    ft_embed = query_json("trials", name, "--storage", url, "--method", "ft_embed")
    assert {row["lr_embedder"] for row in ft_embed} == {1e-4, 1e-3}
    by_f1 = [row["f1"] for row in query_json("trials", name, "--storage", url, "--sort", "f1")]
    known = [f1 for f1 in by_f1 if f1 is not None]
    assert known == sorted(known, reverse=True) and by_f1[-1] is None  # the failed trial last
    table = ragsweep("trials", name, "--storage", url)
    assert table.returncode == 0 and "ft_gen/1" in table.stdout and "diverged" in table.stdout
    assert "--limit 0 shows all" not in table.stdout  # every trial fits the default table
    best_two = query_json("trials", name, "--storage", url, "--sort", "f1", "--limit", "2")
    assert [row["f1"] for row in best_two] == known[:2]
    short = ragsweep("trials", name, "--storage", url, "--sort", "f1", "--limit", "1")
    assert f"the first 1 of {len(by_f1)} trials" in short.stdout.replace("\n", " ")


def test_best_is_the_highest_metric_with_its_whole_record(study):
    name, url = study
    trials = optuna_trials(url, name)
    complete = {k: t for k, t in trials.items() if t.state == optuna.trial.TrialState.COMPLETE}
    for metric, key in (("f1", "f1"), ("recall", "recall_at_k")):
        best = query_json("best", name, "--storage", url, "--metric", metric)
        assert best["metrics"][key] == max(t.user_attrs["metrics"][key] for t in complete.values())
        trial = complete[best["trial"]]
        assert best["record"] == trial.user_attrs["record"]
        assert best["record"]["data_fingerprint"] and best["record"]["environment"]["git"]
    ft_gen = query_json("best", name, "--storage", url, "--method", "ft_gen")
    assert ft_gen["trial"] == "ft_gen/0" and ft_gen["lr_generator"] == 1e-3


def test_pareto_front_holds_exactly_the_undominated_trials(study):
    name, url = study
    front = query_json("pareto", name, "--storage", url, "--cost", "train_device_s")
    rows = query_json("trials", name, "--storage", url, "--state", "complete")
    # Run cost: a trial's own training plus the phases it loaded from another stage's checkpoint.
    costs = {row["trial"]: _run_device_s(url, name, row["trial"]) for row in rows}
    f1 = {row["trial"]: row["f1"] for row in rows}

    def dominated(trial: str) -> bool:
        return any(
            f1[o] >= f1[trial]
            and costs[o] <= costs[trial]
            and (f1[o] > f1[trial] or costs[o] < costs[trial])
            for o in f1
        )

    assert {row["trial"] for row in front} == {t for t in f1 if not dominated(t)}
    assert [row["run_device_s"] for row in front] == sorted(row["run_device_s"] for row in front)
    assert all(row["run_device_s"] == pytest.approx(costs[row["trial"]]) for row in front)


def _run_device_s(url: str, name: str, trial_id: str) -> float:
    trials = optuna_trials(url, name)
    trial = trials[trial_id]
    total = trial.user_attrs["metrics"]["train_device_s"]
    for phase, folder in trial.user_attrs["record"]["config"]["reuse"].items():
        [source] = [
            t for t in trials.values() if t.user_attrs.get("checkpoint") == str(Path(folder).parent)
        ]
        total += source.user_attrs["metrics"][f"{phase}.device_s"]
    return total


def test_compare_gives_the_papers_table_with_shared_search_cost(study):
    name, url = study
    rows = {row["method"]: row for row in query_json("compare", name, "--storage", url)}
    assert list(rows) == load_spec(DEMO).methods
    trials = optuna_trials(url, name)
    for method, row in rows.items():
        own = [
            t
            for k, t in trials.items()
            if k.startswith(f"{method}/") and t.state.name == "COMPLETE"
        ]
        assert row["f1"] == max(t.user_attrs["metrics"]["f1"] for t in own)
    # two_phase's search is its own grid plus ft_gen's (its phase 1), failed trial included.
    assert rows["two_phase"]["search_stages"] == {"ft_gen": 2, "two_phase": 2}
    assert rows["rag_token"]["search_stages"] == {"ft_gen": 2, "two_phase": 2, "rag_token": 1}
    assert rows["independent"]["search_trials"] == 5
    two_phase_search = sum(
        t.user_attrs.get("metrics", {}).get("train_flops", 0)
        for k, t in trials.items()
        if k.split("/")[0] in ("ft_gen", "two_phase")
    )
    assert rows["two_phase"]["search_flops"] == pytest.approx(two_phase_search)
    assert (
        rows["two_phase"]["run_flops"]
        > trials[rows["two_phase"]["trial"]].user_attrs["metrics"]["train_flops"]
    )
    _ANSWERS[url.split(":")[0]] = {
        "compare": list(rows.values()),
        "trials": query_json("trials", name, "--storage", url),
    }
    table = ragsweep("compare", name, "--storage", url)
    assert table.returncode == 0, table.stderr
    assert "whole study: 10 trials" in table.stdout
    assert (
        "stage ft_gen (2 trials) serves ft_gen, independent, two_phase, rag_token, rag_sequence"
        in table.stdout
    )
    # Generated data has gold passages: the paper's advice is independent.
    assert "context labels" in table.stdout and "recommends independent" in table.stdout


def test_compare_and_best_show_the_runs_later_stages_built_on(study):
    # One best-trial rule (ties to the earliest trial) for the launch and for the queries.
    name, url = study
    rows = {row["method"]: row for row in query_json("compare", name, "--storage", url)}
    trials = optuna_trials(url, name)
    saved = {
        t.user_attrs["checkpoint"]: key for key, t in trials.items() if "checkpoint" in t.user_attrs
    }
    [independent] = [t for key, t in trials.items() if key.startswith("independent/")]
    loaded = independent.user_attrs["record"]["config"]["reuse"]
    reused = {phase: saved[str(Path(folder).parent)] for phase, folder in loaded.items()}
    assert reused == {"embedder": rows["ft_embed"]["trial"], "generator": rows["ft_gen"]["trial"]}
    for method in ("ft_embed", "ft_gen"):
        best = query_json("best", name, "--storage", url, "--method", method)
        assert best["trial"] == rows[method]["trial"]


def test_markdown_gives_the_tables_for_docs(study):
    name, url = study
    compare = ragsweep("compare", name, "--storage", url, "--format", "markdown")
    assert compare.returncode == 0, compare.stderr
    # The table of results, then the table of their intervals (every trial stores its answers).
    results, intervals = (
        [line for line in table.splitlines() if line.startswith("|")]
        for table in compare.stdout.split("\n\n")[:3:2]
    )
    for rows in (results, intervals):
        assert rows[1] == "|" + "---|" * rows[0].count(" | ") + "---|"
        assert [row.split(" | ")[0].removeprefix("| ") for row in rows[2:]] == load_spec(
            DEMO
        ).methods
    assert results[0].startswith("| method | lr E | lr G | EM | F1 | Recall@k |")
    assert intervals[0].startswith("| method | trial | questions | EM 95% | F1 95% |")
    assert "2000 resamples, seed 0" in compare.stdout
    assert "whole study: 10 trials" in compare.stdout  # the notes follow the table
    trials = ragsweep("trials", name, "--storage", url, "--format", "markdown")
    assert trials.returncode == 0, trials.stderr
    assert len(trials.stdout.strip().splitlines()) == 2 + len(
        query_json("trials", name, "--storage", url)
    )


_ANSWERS: dict[str, dict] = {}  # backend -> answers, filled by the test above on each backend
# Figures that do not depend on timing: the same trials run on CPU give the same ones.
_DETERMINISTIC = (
    "trial",
    "method",
    "state",
    "lr_embedder",
    "lr_generator",
    "em",
    "f1",
    "recall_at_k",
    "train_flops",
    "run_flops",
    "search_stages",
    "search_flops",
    "fail_reason",
)


def test_sqlite_and_postgresql_give_the_same_answers(study):
    if set(_ANSWERS) != {"sqlite", "postgresql+psycopg"}:
        pytest.skip("runs after both backends answered (PostgreSQL is set up by .ci/run)")
    sqlite, postgresql = _ANSWERS["sqlite"], _ANSWERS["postgresql+psycopg"]
    for query in ("compare", "trials"):
        for left, right in zip(sqlite[query], postgresql[query], strict=True):
            assert {k: v for k, v in left.items() if k in _DETERMINISTIC} == {
                k: v for k, v in right.items() if k in _DETERMINISTIC
            }


def test_export_writes_every_trial_with_every_attribute(study, tmp_path):
    name, url = study
    trials = optuna_trials(url, name)
    assert (
        ragsweep("export", name, "--storage", url, "-o", str(tmp_path / "t.json")).returncode == 0
    )
    exported = {row["trial"]: row for row in json.loads((tmp_path / "t.json").read_text())}
    assert set(exported) == set(trials)
    for key, trial in trials.items():
        for attr, value in trial.user_attrs.items():
            assert exported[key][attr] == value
    assert ragsweep("export", name, "--storage", url, "-o", str(tmp_path / "t.csv")).returncode == 0
    rows = list(csv.DictReader(io.StringIO((tmp_path / "t.csv").read_text())))
    assert len(rows) == len(trials) and {"record", "metrics", "fail_reason"} <= set(rows[0])
    assert json.loads(rows[0]["metrics"]) == exported[rows[0]["trial"]]["metrics"]


def test_plot_draws_the_front_and_a_heat_map_for_a_coupled_grid(study, tmp_path):
    name, url = study
    separable = tmp_path / "demo.png"
    joint = tmp_path / "joint.png"
    assert ragsweep("plot", name, "--storage", url, "-o", str(separable)).returncode == 0
    assert ragsweep("plot", f"{name}-joint", "--storage", url, "-o", str(joint)).returncode == 0
    one_panel, two_panels = matplotlib.image.imread(separable), matplotlib.image.imread(joint)
    # The joint study's 2 x 2 grid adds a heat-map panel beside the quality-cost panel.
    assert two_panels.shape[1] > 1.4 * one_panel.shape[1]
    assert one_panel.std() > 0.05  # something was drawn


def test_query_mistakes_get_one_line_and_change_nothing(study, tmp_path):
    name, url = study
    before = sorted(optuna.get_all_study_names(open_storage(url)))
    missing_study = ragsweep("trials", "nope", "--storage", url)
    assert_one_line_error(missing_study, "no study 'nope'", name)
    assert_one_line_error(
        ragsweep("reproduce", name, "--trial", "ft_gen/7", "--storage", url), "no trial 'ft_gen/7'"
    )
    assert_one_line_error(
        ragsweep("best", name, "--metric", "bleu", "--storage", url), "metric 'bleu'", "f1"
    )
    assert_one_line_error(
        ragsweep("pareto", name, "--cost", "money", "--storage", url), "cost 'money'"
    )
    assert_one_line_error(
        ragsweep("trials", name, "--format", "xml", "--storage", url), "--format 'xml'"
    )
    assert_one_line_error(
        ragsweep("export", name, "-o", str(tmp_path / "t.txt"), "--storage", url), ".json or .csv"
    )
    assert sorted(optuna.get_all_study_names(open_storage(url))) == before
    missing_file = tmp_path / "absent.db"
    assert_one_line_error(
        ragsweep("studies", "--storage", f"sqlite:///{missing_file}"), "does not exist"
    )
    assert not missing_file.exists()


def test_query_commands_import_no_torch_transformers_or_ray(tmp_path):
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    fill_launch(url, "demo")
    # What the process has imported when it exits, on stderr's last line.
    probe = (
        "import atexit, sys\n"
        "heavy = ('torch', 'transformers', 'ray')\n"
        "atexit.register(lambda: print('imported:', *[m for m in heavy if m in sys.modules], "
        "file=sys.stderr))\n"
        "from search.cli import main\n"
        "main()\n"
    )
    for command in (["studies"], ["trials", "demo"], ["best", "demo"], ["compare", "demo"]):
        result = subprocess.run(
            [sys.executable, "-c", probe, *command, "--storage", url, "--format", "json"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert result.stderr.splitlines()[-1] == "imported:", (command, result.stderr)
        assert json.loads(result.stdout)


def test_reproduce_best_gives_the_recorded_metrics_and_saves_the_models(study, tmp_path):
    name, url = study
    if not url.startswith("sqlite"):
        pytest.skip("one reproduction is enough; the record is read the same way from PostgreSQL")
    out = tmp_path / "models"
    result = ragsweep(
        "reproduce",
        name,
        "--best",
        "--storage",
        url,
        "--out",
        str(out),
        "--merged",
        "--format",
        "json",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["matches"] and report["recorded"] == report["reproduced"]
    assert set(report["recorded"]) >= {"em", "f1"}
    # Every validation question answered and retrieved for as recorded, not only the means.
    same, questions = report["same_answers"]
    assert same == questions > 0
    best = query_json("best", name, "--storage", url)
    assert report["trial"] == best["trial"]
    saved = report["saved"]
    if "embedder" in saved:
        from sentence_transformers import SentenceTransformer

        assert SentenceTransformer(saved["embedder"]).encode(["a question"]).shape[0] == 1
    if "generator" in saved:
        assert (Path(saved["generator"]) / "adapter_config.json").is_file()
        assert (Path(saved["merged generator"]) / "config.json").is_file()


def test_reproduce_exits_non_zero_when_the_metrics_differ(study, tmp_path):
    name, url = study
    if not url.startswith("sqlite"):
        pytest.skip("edits the SQLite file directly")
    # A copy of the database in which ft_embed/0's recorded F1 is off by 0.5.
    copy = tmp_path / "edited.db"
    source = url.removeprefix("sqlite:///")
    with sqlite3.connect(source) as src, sqlite3.connect(copy) as dst:
        src.backup(dst)
    trial = optuna_trials(url, name)["ft_embed/0"]
    metrics = trial.user_attrs["metrics"] | {"f1": trial.user_attrs["metrics"]["f1"] + 0.5}
    with sqlite3.connect(copy) as db:
        db.execute(
            "UPDATE trial_user_attributes SET value_json = ? WHERE trial_id = ? AND key = 'metrics'",
            (json.dumps(metrics), trial._trial_id),
        )
    result = ragsweep("reproduce", name, "--trial", "ft_embed/0", "--storage", f"sqlite:///{copy}")
    assert result.returncode == 1, result.stderr
    assert "DIFFER" in result.stdout and "5.00e-01" in result.stdout


def test_dashboard_serves_the_database_on_loopback_only(study):
    _, url = study
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from search.cli import main; main()",
            "dashboard",
            "--storage",
            url,
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        body = _get_when_up(f"http://127.0.0.1:{port}/api/studies", timeout_s=60)
        names = {entry["study_name"] for entry in json.loads(body)["study_summaries"]}
        assert names >= set(optuna.get_all_study_names(open_storage(url)))
        assert _listening_addresses(port) == {"127.0.0.1"}
    finally:
        server.terminate()
        server.wait(timeout=30)


def _get_when_up(address: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(address, timeout=5) as response:
                return response.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _listening_addresses(port: int) -> set[str]:
    """Local IPv4 addresses with a socket listening on ``port`` (from /proc/net/tcp)."""
    addresses = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            addresses.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return addresses
