"""``ragsweep train`` in a subprocess: metrics on success, one clear line and exit 2 on bad input."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.cli import ragsweep as run_ragsweep
from tests.tiny import TINY_SPEC

REPO = Path(__file__).resolve().parents[2]


def ragsweep(*args: str, cache_dir: Path) -> subprocess.CompletedProcess[str]:
    """``ragsweep ARGS`` in this process (tests.cli), with its model/index cache in ``cache_dir``."""
    return run_ragsweep(*args, env={"RAGSWEEP_CACHE": str(cache_dir)})


def write_spec(tmp_path: Path, spec: dict, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return path


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr
    assert result.stdout.strip() == "", f"a refused command printed: {result.stdout}"
    for fragment in fragments:
        assert fragment in lines[0]


def test_train_prints_metrics_and_record_as_json(tmp_path, cache_dir):
    spec = write_spec(tmp_path, TINY_SPEC)
    result = ragsweep(
        "train",
        "--spec",
        str(spec),
        "--method",
        "rag_token",
        "--lr-embedder",
        "1e-3",
        "--lr-generator",
        "1e-3",
        "--json",
        "--out",
        str(tmp_path / "run"),
        cache_dir=cache_dir,
    )
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert 0 <= printed["metrics"]["f1"] <= 1 and printed["metrics"]["joint.steps"] == 4
    assert printed["record"]["config"]["method"] == "rag_token"
    assert printed["record"]["environment"]["packages"]["torch"]
    assert (tmp_path / "run" / "joint" / "embedder").is_dir() and (
        tmp_path / "run" / "joint" / "generator"
    ).is_dir()
    assert (
        json.loads((tmp_path / "run" / "trial.json").read_text())["metrics"] == printed["metrics"]
    )


def test_train_prints_a_table_by_default(tmp_path, cache_dir):
    spec = write_spec(tmp_path, TINY_SPEC)
    result = ragsweep("train", "--spec", str(spec), "--method", "none", cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr
    assert "recall_at_k" in result.stdout and "index_build_s" in result.stdout


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--method", "joint"], ["--method 'joint'", "rag_token"]),
        (["--method", "ft_gen"], ["lr_generator", "--lr-generator"]),
        (["--method", "ft_embed", "--lr-embedder", "-1"], ["lr_embedder", "greater than 0"]),
        (["--method", "none", "--out", "spec.yaml/out"], ["--out", "is a file", "give a folder"]),
    ],
)
def test_bad_arguments_get_one_line(tmp_path, cache_dir, args, fragments):
    spec = write_spec(tmp_path, TINY_SPEC)
    args = [arg.replace("spec.yaml", str(spec)) for arg in args]
    assert_one_line_error(
        ragsweep("train", "--spec", str(spec), *args, cache_dir=cache_dir), *fragments
    )


@pytest.mark.parametrize(
    ("spec_text", "fragments"),
    [
        ("name: [unclosed", ["not valid YAML", "line"]),
        ("- just\n- a list\n", ["mapping"]),
        ("trainig: {k: 5}\n", ["unknown field 'trainig'"]),
        ("training: {k: 0}\n", ["training.k", "greater than 0"]),
        ("methods: []\n", ["methods", "at least one method"]),
        ("methods: [ft_embd]\n", ["methods.0"]),
        ("data: {source: popqa}\n", ["needs data.path or data.hub_name"]),
        ("training: {prompt_template: 'no fields'}\n", ["prompt_template", "{context}"]),
    ],
)
def test_bad_specs_get_one_line(tmp_path, cache_dir, spec_text, fragments):
    spec = tmp_path / "bad.yaml"
    spec.write_text(spec_text)
    assert_one_line_error(
        ragsweep("train", "--spec", str(spec), "--method", "none", cache_dir=cache_dir), *fragments
    )


def test_set_changes_any_spec_field(cache_dir):
    result = ragsweep(
        "plan",
        str(REPO / "studies" / "popqa-cpu.yaml"),
        "--set",
        "search.joint=cartesian",
        "--set",
        "methods=[rag_token]",
        cache_dir=cache_dir,
    )
    assert result.returncode == 0, result.stderr
    assert "total: 15 trials" in result.stdout  # the joint method's own 3 x 5 grid


def test_plan_takes_launchs_concurrency_and_data_path(tmp_path, cache_dir):
    # Copied from a launch's command line, they forecast what that launch runs: with all the
    # questions left for training (n_train null), PopQA's hub split has a known size, a local
    # file not (the plan reads no data).
    spec = str(REPO / "studies" / "popqa-cpu.yaml")
    all_left = ("--set", "data.n_train=null")
    hub = ragsweep("plan", spec, *all_left, "--concurrency", "3", cache_dir=cache_dir)
    assert hub.returncode == 0, hub.stderr
    hub_text = " ".join(hub.stdout.split())  # lines wrap
    assert "with 3 concurrent trial(s)" in hub_text and "forecast unknown" not in hub_text
    local = tmp_path / "popqa.jsonl"
    local.write_text("")
    planned = ragsweep("plan", spec, *all_left, "--data-path", str(local), cache_dir=cache_dir)
    assert planned.returncode == 0, planned.stderr
    assert "training set size is unknown" in " ".join(planned.stdout.split())


@pytest.mark.parametrize(
    ("setting", "fragments"),
    [
        ("search.joint", ["not KEY=VALUE", "--set search.joint=cartesian"]),
        ("methods=[rag_token", ["not a YAML value", "'methods=[rag_token]'"]),
        ("search.jiont=cartesian", ["unknown field 'search.jiont'"]),
        ("methods=[rag_tokn]", ["methods.0"]),
    ],
)
def test_bad_set_gets_one_line(tmp_path, cache_dir, setting, fragments):
    spec = write_spec(tmp_path, TINY_SPEC)
    assert_one_line_error(
        ragsweep("plan", str(spec), "--set", setting, cache_dir=cache_dir), *fragments
    )


def test_missing_spec_file(tmp_path, cache_dir):
    result = ragsweep(
        "train", "--spec", str(tmp_path / "nope.yaml"), "--method", "none", cache_dir=cache_dir
    )
    assert_one_line_error(result, "does not exist")


def test_hub_dataset_without_a_hub(tmp_path, cache_dir):
    spec = write_spec(
        tmp_path,
        TINY_SPEC
        | {
            "data": {
                "source": "popqa",
                "hub_name": "akariasai/PopQA",
                "corpus_path": str(tmp_path / "c.jsonl"),
            }
        },
    )
    assert_one_line_error(
        ragsweep("train", "--spec", str(spec), "--method", "none", cache_dir=cache_dir),
        "akariasai/PopQA",
        "data.path",
    )


def test_unknown_model_offline(tmp_path, cache_dir):
    spec = write_spec(
        tmp_path,
        TINY_SPEC | {"models": {"embedder": "tiny", "generator": "no-such-org/no-such-model"}},
    )
    assert_one_line_error(
        ragsweep("train", "--spec", str(spec), "--method", "none", cache_dir=cache_dir),
        "no-such-org/no-such-model",
        "local folder",
    )


def test_context_labels_required_by_ft_embed(tmp_path, cache_dir):
    questions = tmp_path / "questions.jsonl"
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "\n".join(
            json.dumps({"id": f"d{i}", "title": f"T{i}", "text": f"fact {i}"}) for i in range(6)
        )
        + "\n"
    )
    questions.write_text(
        "\n".join(
            json.dumps(
                {
                    "id": f"q{i}",
                    "question": f"what is {i}?",
                    "answers": [str(i)],
                    "gold_doc_ids": [],
                }
            )
            for i in range(6)
        )
        + "\n"
    )
    data = {
        "source": "jsonl",
        "path": str(questions),
        "corpus_path": str(corpus),
        "n_train": 4,
        "n_validation": 2,
    }
    spec = write_spec(tmp_path, TINY_SPEC | {"data": data})
    result = ragsweep(
        "train",
        "--spec",
        str(spec),
        "--method",
        "ft_embed",
        "--lr-embedder",
        "1e-4",
        cache_dir=cache_dir,
    )
    assert_one_line_error(result, "context labels", "two_phase")
