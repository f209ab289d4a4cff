"""Study specs: the shipped ones validate, overrides apply, and a spec can name the real samples."""

from __future__ import annotations

from pathlib import Path

import pytest

from search.spec import load_spec, trial_config
from trainers.config import METHODS
from trainers.data import load_data
from trainers.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.mark.parametrize(
    "spec_path", sorted((REPO / "studies").glob("*.yaml")), ids=lambda p: p.name
)
def test_shipped_specs_validate(spec_path):
    spec = load_spec(spec_path)
    assert spec.methods and set(spec.methods) <= set(METHODS)


def test_demo_spec_uses_the_offline_defaults():
    spec = load_spec(REPO / "studies" / "demo.yaml")
    assert spec.data.source == "generated"
    assert (spec.models.embedder, spec.models.generator) == ("minilm", "smollm2-135m")
    assert list(spec.methods) == list(METHODS)


def test_dotted_overrides_reach_nested_fields(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("data: {source: popqa, hub_name: akariasai/PopQA}\n")
    spec = load_spec(path, {"data.path": "/tmp/popqa.json", "training.k": 3})
    assert spec.data.path == "/tmp/popqa.json" and spec.training.k == 3


def test_local_paths_are_made_absolute_for_workers_in_other_folders(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "my-embedder").mkdir()
    (tmp_path / "tiny").mkdir()
    path = tmp_path / "s.yaml"
    path.write_text(
        "data: {source: jsonl, path: data/q.jsonl, corpus_path: data/c.jsonl}\n"
        "models: {embedder: my-embedder, generator: tiny}\n"
    )
    monkeypatch.chdir(tmp_path)
    spec = load_spec(path, {"data.path": "data/other.jsonl"})
    assert spec.data.path == str(tmp_path / "data" / "other.jsonl")
    assert spec.data.corpus_path == str(tmp_path / "data" / "c.jsonl")
    assert spec.models.embedder == str(tmp_path / "my-embedder")  # an existing folder
    assert spec.models.generator == "tiny"  # an alias, even beside a folder of that name


def test_trial_config_resolves_method_and_learning_rates():
    spec = load_spec(REPO / "studies" / "demo.yaml")
    config = trial_config(spec, "two_phase", lr_embedder=1e-5, lr_generator=1e-4, seed=7)
    assert (config.method, config.lr_embedder, config.lr_generator, config.seed) == (
        "two_phase",
        1e-5,
        1e-4,
        7,
    )
    assert config.data == spec.data and config.training == spec.training
    with pytest.raises(ConfigError, match="method"):
        trial_config(spec, "joint", lr_embedder=None, lr_generator=None)


@pytest.mark.parametrize(
    ("source", "relative"),
    [
        ("popqa", "popqa_hipporag2_subset/popqa.json"),
        ("hotpotqa", "hotpotqa_ircot_dev500/dev_subsampled.jsonl"),
    ],
)
def test_a_spec_can_name_a_shared_sample(tmp_path, source, relative):
    sample = SHARED_DATA / relative
    if not sample.exists():
        pytest.skip(
            f"{sample} not present (../shared/data is beside the repo only on dev and CI machines)"
        )
    path = tmp_path / "s.yaml"
    path.write_text(f"data: {{source: {source}, path: {sample}, n_train: 32, n_validation: 16}}\n")
    data = load_data(load_spec(path).data)
    assert len(data.train) == 32 and len(data.validation) == 16
    assert data.has_context_labels and len(data.corpus) > 100
