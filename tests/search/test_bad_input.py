"""Mistakes a user makes with ``ragsweep launch``, one test each: exit code 2, one line on stderr
that names the problem and the fix, no traceback, and the study database byte-for-byte as it was.

(``ragsweep train``'s bad arguments and specs are in test_cli.py; a missing trial number and
query commands on a missing study belong with the query commands.)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from search.launch._lease import LAUNCH_ATTR, LaunchOwner
from search.spec import load_spec
from search.store import open_stage_study, open_storage
from tests.cli import ragsweep_process
from tests.search.test_cli import assert_one_line_error, ragsweep
from tests.tiny import TINY_SPEC

GOOD = TINY_SPEC | {"methods": ["ft_embed"], "search": {"lr_embedder": [1e-3]}}
JSONL_DATA = {"source": "jsonl", "path": "q.jsonl", "corpus_path": "c.jsonl"}
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")


def _spec_file(folder: Path, spec: dict, name: str = "spec.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def template_db(tmp_path_factory) -> Path:
    """A database holding someone's finished study, a study made with another spec under the
    name 'taken', and a study that a live launch (this test process) is running as 'busy'."""
    folder = tmp_path_factory.mktemp("template")
    path = folder / "studies.db"
    storage = open_storage(f"sqlite:///{path}")
    study = optuna.create_study(study_name="someone/ft_embed", storage=storage)
    study.set_user_attr("ragsweep.group", "someone")
    study.add_trial(
        optuna.trial.create_trial(
            params={"lr_embedder": 1e-3},
            distributions={"lr_embedder": optuna.distributions.FloatDistribution(1e-5, 1e-2)},
            value=0.5,
            user_attrs={"metrics": {"f1": 0.5}},
        )
    )
    taken = load_spec(_spec_file(folder, GOOD | {"name": "taken", "seed": 99}, "taken.yaml"))
    open_stage_study(storage, taken, "ft_embed")
    busy = load_spec(_spec_file(folder, GOOD | {"name": "busy"}, "busy.yaml"))
    open_stage_study(storage, busy, "ft_embed").set_user_attr(
        LAUNCH_ATTR, dict(LaunchOwner.this_process())
    )
    storage.engine.dispose()
    return path


@pytest.fixture
def db(template_db, tmp_path) -> Path:
    path = tmp_path / "studies.db"
    shutil.copy(template_db, path)
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file, folder and link under ``folder``: a hash of each file, "dir" for each
    folder, the target of each link."""

    def state(path: Path) -> str:
        if path.is_symlink():
            return f"link to {os.readlink(path)}"
        return "dir" if path.is_dir() else _digest(path)

    return {str(path.relative_to(folder)): state(path) for path in sorted(folder.rglob("*"))}


def _launch(
    tmp_path: Path,
    db: Path | None,
    spec: dict | str,
    *args: str,
    cache_dir: Path,
    new_process: bool = False,
):
    """Run ``ragsweep launch`` on ``spec`` against ``db`` (None: a new database file), in this
    process or (``new_process``) in a new interpreter; assert that nothing in ``tmp_path`` was
    created or changed."""
    path = tmp_path / "spec.yaml"
    path.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec))
    before = _snapshot(tmp_path)
    command = [
        "launch",
        str(path),
        "--storage",
        f"sqlite:///{db or tmp_path / 'new' / 'studies.db'}",
        "--runs-dir",
        str(tmp_path / "runs"),
        *args,
    ]
    if new_process:
        result = ragsweep_process(*command, env={"RAGSWEEP_CACHE": str(cache_dir)})
    else:
        result = ragsweep(*command, cache_dir=cache_dir)
    assert _snapshot(tmp_path) == before, "the bad launch created or changed files"
    return result


def _questions(folder: Path, rows: list[dict]) -> Path:
    path = folder / "questions.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _corpus(folder: Path, n: int = 6) -> Path:
    path = folder / "corpus.jsonl"
    rows = [{"id": f"d{i}", "title": f"T{i}", "text": f"fact {i}"} for i in range(n)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _unlabelled_data(folder: Path) -> dict:
    rows = [
        {"id": f"q{i}", "question": f"what is {i}?", "answers": [str(i)], "gold_doc_ids": []}
        for i in range(6)
    ]
    return {
        "source": "jsonl",
        "path": str(_questions(folder, rows)),
        "corpus_path": str(_corpus(folder)),
        "n_train": 4,
        "n_validation": 2,
    }


# Mistakes in the spec file itself: (spec, what the one line must say).
SPEC_MISTAKES = {
    "malformed_yaml": ("name: [unclosed\n", ["not valid YAML", "at line", "fix the syntax"]),
    "spec_is_a_list": ("- ft_embed\n- ft_gen\n", ["must hold a mapping"]),
    "unknown_top_level_key": (GOOD | {"trainig": {"k": 3}}, ["unknown field 'trainig'"]),
    "unknown_nested_key": (
        GOOD | {"training": TINY_SPEC["training"] | {"learning_rate": 1e-3}},
        ["unknown field 'training.learning_rate'", "spelling"],
    ),
    "unknown_method": (GOOD | {"methods": ["ft_embd"]}, ["methods.0", "ft_embed"]),
    "no_methods": (GOOD | {"methods": []}, ["methods", "at least one method"]),
    "empty_lr_grid": (
        GOOD | {"search": {"lr_embedder": []}},
        ["search.lr_embedder", "at least one learning rate"],
    ),
    "zero_learning_rate": (
        GOOD | {"search": {"lr_embedder": [0.0, 1e-3]}},
        ["search.lr_embedder.0", "greater than 0"],
    ),
    "negative_learning_rate": (
        GOOD | {"search": {"lr_generator": [-1e-4]}},
        ["search.lr_generator.0", "greater than 0"],
    ),
    "repeated_learning_rate": (
        GOOD | {"search": {"lr_embedder": [1e-3, 1e-3]}},
        ["search.lr_embedder", "repeated"],
    ),
    "reversed_lr_range": (
        GOOD | {"search": {"sampler": "tpe", "lr_embedder_range": [1e-3, 1e-5]}},
        ["search.lr_embedder_range", "low < high"],
    ),
    "unknown_sampler": (GOOD | {"search": {"sampler": "bayes"}}, ["search.sampler", "'grid'"]),
    "early_stopping_with_two_objectives": (
        GOOD
        | {
            "search": {"early_stopping": True},
            "objectives": [
                {"metric": "f1", "direction": "maximize"},
                {"metric": "train_flops", "direction": "minimize"},
            ],
        },
        ["search.early_stopping needs one objective", "turn early stopping off"],
    ),
    "retrieval_evaluation_ranked_by_f1": (
        GOOD | {"training": TINY_SPEC["training"] | {"evaluate": "retrieval"}},
        ["training.evaluate is retrieval", "objectives ask for f1", "metric: recall_at_k"],
    ),
    "unknown_evaluation": (
        GOOD | {"training": TINY_SPEC["training"] | {"evaluate": "generation"}},
        ["training.evaluate", "'answers'"],
    ),
    "early_stopping_rung_past_the_end": (
        GOOD | {"search": {"early_stopping": {"rungs": [0.5, 1.0]}}},
        ["search.early_stopping.rungs", "between 0 and 1"],
    ),
    "early_stopping_unknown_field": (
        GOOD | {"search": {"early_stopping": {"patience": 2}}},
        ["unknown field 'search.early_stopping.patience'"],
    ),
    "zero_trial_budget": (
        GOOD | {"search": {"sampler": "random", "n_trials": 0}},
        ["search.n_trials", "greater than 0"],
    ),
    "k_zero": (
        GOOD | {"training": TINY_SPEC["training"] | {"k": 0}},
        ["training.k", "greater than 0"],
    ),
    "no_objectives": (GOOD | {"objectives": []}, ["objectives", "at least one objective"]),
    "unknown_direction": (
        GOOD | {"objectives": [{"metric": "f1", "direction": "up"}]},
        ["objectives.0.direction", "'maximize'"],
    ),
    "zero_concurrency_in_spec": (GOOD | {"concurrency": 0}, ["concurrency", "greater than 0"]),
    "prompt_without_context": (
        GOOD | {"training": TINY_SPEC["training"] | {"prompt_template": "Q: {question}"}},
        ["prompt_template", "{context}"],
    ),
    "two_corpora": (
        GOOD | {"data": JSONL_DATA | {"corpus_hub_name": "MedRAG/wikipedia"}},
        ["data", "corpus_path and data.corpus_hub_name both name a corpus; keep one"],
    ),
    "corpus_columns_unknown_key": (
        GOOD | {"data": JSONL_DATA | {"corpus_columns": {"body": "content"}}},
        ["unknown field 'data.corpus_columns.body'"],
    ),
    "jsonl_without_corpus": (
        GOOD | {"data": {"source": "jsonl", "path": "questions.jsonl"}},
        ["data.corpus_path"],
    ),
    "seed_not_a_number": (GOOD | {"seed": "abc"}, ["seed", "integer"]),
    "objective_metric_typo": (
        GOOD | {"objectives": [{"metric": "f_1"}]},
        ["objectives.0", "'f_1' is not a figure trials report", "recall_at_k"],
    ),
    "quality_objective_minimized": (
        GOOD | {"objectives": [{"metric": "f1", "direction": "minimize"}]},
        ["objectives.0", "f1 is a quality figure", "direction: maximize"],
    ),
    "empty_study_name": (GOOD | {"name": ""}, ["name:", "change name"]),
    "study_name_with_a_slash": (GOOD | {"name": "a/b"}, ["name:", "'a/b'", "change name"]),
    "epochs_absurd": (
        GOOD | {"training": TINY_SPEC["training"] | {"epochs": 1_000_000_000}},
        ["training.epochs", "less than or equal to 1000", "1000000000", "change training.epochs"],
    ),
    "epochs_in_e_notation": (
        GOOD | {"training": TINY_SPEC["training"] | {"epochs": "1e9"}},
        ["training.epochs", "'1e9'", "change training.epochs"],
    ),
    "k_absurd": (
        GOOD | {"training": TINY_SPEC["training"] | {"k": 100_000}},
        ["training.k", "less than or equal to 1000", "change training.k"],
    ),
    "index_unknown_kind": (
        GOOD | {"training": TINY_SPEC["training"] | {"index": {"kind": "ivf"}}},
        ["training.index.kind", "'ivf'", "'flat'", "'hnsw'"],
    ),
    "index_parameter_of_another_kind": (
        GOOD | {"training": TINY_SPEC["training"] | {"index": {"kind": "flat", "nlist": 1024}}},
        ["training.index", "nlist applies to kind ivf_flat or ivf_pq only", "change kind"],
    ),
    "index_nprobe_above_nlist": (
        GOOD
        | {
            "training": TINY_SPEC["training"]
            | {"index": {"kind": "ivf_flat", "nlist": 8, "nprobe": 16}}
        },
        ["training.index", "nprobe 16 exceeds nlist 8", "at most nlist"],
    ),
    "index_unknown_parameter": (
        GOOD | {"training": TINY_SPEC["training"] | {"index": {"kind": "hnsw", "m": 16}}},
        ["unknown field 'training.index.m'"],
    ),
    "device_gpu": (
        GOOD | {"training": TINY_SPEC["training"] | {"device": "gpu"}},
        ["training.device", "'gpu' is not a device", "cuda:N"],
    ),
    "grid_of_a_thousand_rates": (
        GOOD | {"search": {"lr_embedder": [i * 1e-6 for i in range(1, 1001)]}},
        ["search.lr_embedder", "1000 learning rates", "at most 100"],
    ),
    "empty_spec_file": ("", ["is empty", "studies/demo.yaml"]),
    "spec_only_a_comment": ("# nothing yet\n", ["is empty", "studies/demo.yaml"]),
}


@pytest.mark.parametrize("case", SPEC_MISTAKES)
def test_spec_mistake(case, tmp_path, db, cache_dir):
    spec, fragments = SPEC_MISTAKES[case]
    assert_one_line_error(_launch(tmp_path, db, spec, cache_dir=cache_dir), *fragments)


@pytest.mark.parametrize(
    ("make", "fragments"),
    [
        (lambda path: path.mkdir(), ["is a folder", "studies/demo.yaml"]),
        (lambda path: path.write_bytes(b"name: caf\xe9\n"), ["not UTF-8", "save it as UTF-8"]),
        (lambda path: path.write_bytes(b"\xff\xfe\x00n\x00"), ["not UTF-8"]),
        (
            lambda path: path.write_text("name: demo\n" + "# padding\n" * 200_000),
            ["MiB, not a spec", "studies/demo.yaml"],
        ),
        (lambda path: path.symlink_to(path.parent / "gone.yaml"), ["does not exist"]),
    ],
    ids=["spec_is_a_folder", "spec_latin1", "spec_utf16", "spec_huge", "spec_dangling_symlink"],
)
def test_spec_file_that_is_not_a_spec(make, fragments, tmp_path, db, cache_dir):
    path = tmp_path / "odd spec ü.yaml"  # a space and a non-ASCII letter in the path, too
    make(path)
    before = _snapshot(tmp_path)
    result = ragsweep("launch", str(path), "--storage", f"sqlite:///{db}", cache_dir=cache_dir)
    assert_one_line_error(result, *fragments)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("spec", "fragments"),
    [
        (
            {"data": {"source": "hotpotqa", "path": "/nonexistent/missing.jsonl"}},
            ["missing.jsonl", "does not exist"],
        ),
        ({"training": TINY_SPEC["training"] | {"k": 500}}, ["training.k is 500"]),
        ({"resources": {"cpus": 512}}, ["resources.cpus is 512"]),
    ],
    ids=["missing_data", "k_larger_than_corpus", "too_many_cpus"],
)
def test_a_refused_launch_creates_no_database(spec, fragments, tmp_path, cache_dir):
    """The new database (its folder, its file, Optuna's tables) is made only once every check
    of the data, the models and the Ray cluster has passed."""
    result = _launch(tmp_path, None, GOOD | spec, cache_dir=cache_dir)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "new").exists()


def test_missing_spec_file(tmp_path, db, cache_dir):
    before = _digest(db)
    result = ragsweep(
        "launch", str(tmp_path / "nope.yaml"), "--storage", f"sqlite:///{db}", cache_dir=cache_dir
    )
    assert_one_line_error(result, "nope.yaml", "does not exist", "studies/demo.yaml")
    assert _digest(db) == before


def test_dataset_file_not_found(tmp_path, db, cache_dir):
    spec = GOOD | {"data": {"source": "hotpotqa", "path": str(tmp_path / "missing.jsonl")}}
    result = _launch(tmp_path, db, spec, cache_dir=cache_dir)
    assert_one_line_error(result, "missing.jsonl", "does not exist", "fix the path")


def test_a_refused_launch_in_a_new_interpreter_prints_one_line(tmp_path, db, cache_dir):
    """As a user's shell runs it: nothing the libraries print as they load (only a new
    interpreter loads them) gets beside the one line."""
    spec = GOOD | {"data": {"source": "hotpotqa", "path": str(tmp_path / "missing.jsonl")}}
    result = _launch(tmp_path, db, spec, cache_dir=cache_dir, new_process=True)
    assert_one_line_error(result, "missing.jsonl", "does not exist", "fix the path")


def test_data_path_override_not_found(tmp_path, db, cache_dir):
    spec = GOOD | {"data": {"source": "popqa", "path": "placeholder.jsonl"}}
    result = _launch(
        tmp_path, db, spec, "--data-path", str(tmp_path / "typo.jsonl"), cache_dir=cache_dir
    )
    assert_one_line_error(result, "typo.jsonl", "does not exist")


def test_hub_dataset_offline(tmp_path, db, cache_dir):
    data = {"source": "popqa", "hub_name": "akariasai/PopQA", "corpus_path": str(_corpus(tmp_path))}
    result = _launch(tmp_path, db, GOOD | {"data": data}, cache_dir=cache_dir)
    assert_one_line_error(result, "akariasai/PopQA", "data.path")


def test_hub_corpus_offline(tmp_path, db, cache_dir):
    data = _unlabelled_data(tmp_path)
    del data["corpus_path"]
    data |= {"corpus_hub_name": "MedRAG/wikipedia", "corpus_columns": {"text": "content"}}
    result = _launch(tmp_path, db, GOOD | {"methods": ["none"], "data": data}, cache_dir=cache_dir)
    assert_one_line_error(
        result, "cannot load corpus 'MedRAG/wikipedia'", "offline", "data.corpus_path"
    )


def test_corpus_columns_that_the_corpus_lacks(tmp_path, db, cache_dir):
    data = _unlabelled_data(tmp_path) | {"corpus_columns": {"text": "content"}}
    result = _launch(tmp_path, db, GOOD | {"methods": ["none"], "data": data}, cache_dir=cache_dir)
    assert_one_line_error(
        result, "data.corpus_path", "lacks the column(s) content", "corpus_columns"
    )


def test_dataset_missing_fields(tmp_path, db, cache_dir):
    rows = [{"id": f"q{i}", "question": f"what is {i}?"} for i in range(6)]  # no answers
    data = {"source": "jsonl", "path": str(_questions(tmp_path, rows))}
    data["corpus_path"] = str(_corpus(tmp_path))
    result = _launch(tmp_path, db, GOOD | {"data": data}, cache_dir=cache_dir)
    assert_one_line_error(result, "lacks the field(s) answers, gold_doc_ids", "add them")


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        (b"", ["is empty", "point it at the file"]),
        (
            b'{"id": "q1", "question": "caf\xe9?", "answers": ["x"], "gold_doc_ids": []}\n',
            ["is not UTF-8 text", "save it as UTF-8"],
        ),
        (b"this is not json\n", ["cannot be read as json", "re-export the file"]),
        (
            b'{"id": "q1", "question": "what?", "answers": "7", "gold_doc_ids": []}\n',
            ["question q1 needs 'answers' as a list of strings", "fix the row"],
        ),
    ],
    ids=["data_empty", "data_latin1", "data_not_json", "data_answers_not_a_list"],
)
def test_data_file_that_cannot_be_used(content, fragments, tmp_path, db, cache_dir):
    questions = tmp_path / "questions ü.jsonl"
    questions.write_bytes(content)
    data = {"source": "jsonl", "path": str(questions), "corpus_path": str(_corpus(tmp_path))}
    result = _launch(tmp_path, db, GOOD | {"data": data}, cache_dir=cache_dir)
    assert_one_line_error(result, *fragments)


def test_method_needing_context_labels_on_unlabelled_data(tmp_path, db, cache_dir):
    spec = GOOD | {"methods": ["independent"], "data": _unlabelled_data(tmp_path)}
    spec["search"] = {"lr_embedder": [1e-3], "lr_generator": [1e-3]}
    result = _launch(tmp_path, db, spec, cache_dir=cache_dir)
    # independent needs ft_embed's embedder, which trains on context labels.
    assert_one_line_error(result, "'ft_embed'", "context labels", "two_phase")


def test_k_larger_than_the_corpus(tmp_path, db, cache_dir):
    spec = GOOD | {"training": TINY_SPEC["training"] | {"k": 500}}
    result = _launch(tmp_path, db, spec, cache_dir=cache_dir)
    assert_one_line_error(result, "training.k is 500", "corpus has only", "lower training.k")


@pytest.mark.parametrize(
    ("index", "fragments"),
    [
        ({"kind": "ivf_flat", "nlist": 100_000}, ["nlist is 100000", "lower training.index.nlist"]),
        ({"kind": "ivf_pq"}, ["ivf_pq needs at least 256 passages", "use kind flat"]),
    ],
    ids=["nlist_above_the_corpus", "ivf_pq_on_a_small_corpus"],
)
def test_an_index_the_corpus_cannot_fill(index, fragments, tmp_path, db, cache_dir):
    spec = GOOD | {"training": TINY_SPEC["training"] | {"index": index}}
    assert_one_line_error(_launch(tmp_path, db, spec, cache_dir=cache_dir), *fragments)


def test_generator_not_found_offline(tmp_path, db, cache_dir):
    spec = GOOD | {"models": {"embedder": "tiny", "generator": "no-such-org/no-such-model"}}
    result = _launch(tmp_path, db, spec, cache_dir=cache_dir)
    assert_one_line_error(result, "no-such-org/no-such-model", "local folder")


def test_embedder_not_found_offline(tmp_path, db, cache_dir):
    spec = GOOD | {"models": {"embedder": "no-such-org/no-such-embedder", "generator": "tiny"}}
    result = _launch(tmp_path, db, spec, cache_dir=cache_dir)
    assert_one_line_error(result, "no-such-org/no-such-embedder")


@NO_GPU
def test_cuda_device_without_a_gpu(tmp_path, db, cache_dir):
    spec = GOOD | {"training": TINY_SPEC["training"] | {"device": "cuda"}}
    result = _launch(tmp_path, db, spec, cache_dir=cache_dir)
    assert_one_line_error(result, "training.device is 'cuda'", "no CUDA device", "'cpu'")


def test_more_cpus_per_trial_than_any_node_has(tmp_path, db, cache_dir):
    spec = GOOD | {"resources": {"cpus": 512}}
    result = _launch(tmp_path, db, spec, cache_dir=cache_dir)
    assert_one_line_error(result, "resources.cpus is 512", "lower resources.cpus")


def test_more_memory_per_trial_than_any_node_has(tmp_path, db, cache_dir):
    spec = GOOD | {"resources": {"memory": "1TiB"}}
    result = _launch(tmp_path, db, spec, cache_dir=cache_dir)
    assert_one_line_error(
        result, "needs 1024.0 GiB of memory (resources.memory)", "lower resources.memory"
    )


def test_a_trial_forecast_larger_than_any_node_is_refused(tmp_path, db, cache_dir):
    # The tiny generator answering a million validation questions at once: terabytes of
    # activations (the forecast takes the models' shapes, whatever their size).
    spec = GOOD | {"training": TINY_SPEC["training"] | {"eval_batch_size": 1_000_000}}
    result = _launch(tmp_path, db, spec, cache_dir=cache_dir)
    assert_one_line_error(result, "forecast peak", "lower training.", "resources.memory")


@NO_GPU
def test_gpus_per_trial_on_a_cluster_without_gpus(tmp_path, db, cache_dir):
    spec = GOOD | {"resources": {"gpus": 1}}
    result = _launch(tmp_path, db, spec, cache_dir=cache_dir)
    assert_one_line_error(result, "resources.gpus is 1", "0 GPUs")


def test_unreachable_ray_cluster(tmp_path, db, cache_dir):
    # A new interpreter: this process is connected to its own Ray already (tests/search/
    # conftest.py), and a launch uses the Ray its process is connected to.
    result = _launch(
        tmp_path, db, GOOD, "--address", "127.0.0.1:1", cache_dir=cache_dir, new_process=True
    )
    assert_one_line_error(result, "no Ray cluster answers at '127.0.0.1:1'", "ray start --head")


def test_study_name_used_with_another_spec(tmp_path, db, cache_dir):
    result = _launch(tmp_path, db, GOOD | {"name": "taken"}, cache_dir=cache_dir)
    assert_one_line_error(result, "'taken' already exists", "different spec", "another name")


def test_study_being_run_by_a_live_launch(tmp_path, db, cache_dir):
    result = _launch(tmp_path, db, GOOD | {"name": "busy"}, cache_dir=cache_dir)
    assert_one_line_error(result, "'busy' is being run by another launch", f"pid {os.getpid()}")


@pytest.mark.parametrize(
    ("option", "value", "fragments"),
    [
        ("--concurrency", "0", ["'--concurrency'", "greater than or equal to 1", "--help"]),
        ("--max-retries", "-1", ["'--max-retries'", "greater than or equal to 0", "--help"]),
        ("--concurrency", "two", ["'--concurrency'", "--help"]),
    ],
    ids=["zero_concurrency_option", "negative_max_retries", "concurrency_not_a_number"],
)
def test_bad_option_value(option, value, fragments, tmp_path, db, cache_dir):
    result = _launch(tmp_path, db, GOOD, option, value, cache_dir=cache_dir)
    assert_one_line_error(result, *fragments)


def test_runs_dir_that_is_a_file(tmp_path, db, cache_dir):
    result = _launch(tmp_path, db, GOOD, "--runs-dir", str(db / "runs"), cache_dir=cache_dir)
    assert_one_line_error(result, "--runs-dir", "is a file, not a folder", "give a folder")


@pytest.mark.parametrize(
    ("storage", "fragments"),
    [
        ("redis://localhost/0", ["scheme 'redis' is not supported", "sqlite:///"]),
        ("studies.db", ["'studies.db' is not a database URL", "sqlite:///"]),
        ("sqlite:////proc/no-such-dir/studies.db", ["cannot create", "folder you can write"]),
    ],
    ids=["unknown_storage_scheme", "storage_not_a_url", "sqlite_folder_not_writable"],
)
def test_bad_storage(storage, fragments, tmp_path, cache_dir):
    spec = _spec_file(tmp_path, GOOD)
    result = ragsweep("launch", str(spec), "--storage", storage, cache_dir=cache_dir)
    assert_one_line_error(result, *fragments)


def test_unreachable_postgresql_masks_the_password(tmp_path, cache_dir):
    spec = _spec_file(tmp_path, GOOD)
    url = "postgresql+psycopg://ragsweep:hunter2-secret@127.0.0.1:1/ragsweep"
    result = ragsweep("launch", str(spec), "--storage", url, cache_dir=cache_dir)
    assert_one_line_error(result, "cannot open storage", "127.0.0.1:1", "server is up")
    assert "hunter2-secret" not in result.stderr + result.stdout
    assert "ragsweep:***@" in result.stderr
