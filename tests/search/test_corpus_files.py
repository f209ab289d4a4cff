"""A study whose corpus is a file: launched on a real local Ray with the corpus as Parquet, and
the same trial run with it as JSONL gives the same metrics."""

from __future__ import annotations

import uuid

import optuna
import torch
import yaml

from search.launch.dispatch import launch
from search.spec import load_spec, trial_config
from search.store import open_storage
from tests.tiny import TINY_SPEC, tiny_rows
from tests.trainers.test_corpus import _jsonl, _parquet
from trainers import run_trial


def test_a_study_gives_the_same_metrics_with_its_corpus_as_parquet_or_jsonl(tmp_path, cache_dir):
    """The corpus of the tiny data set as Parquet, launched on a real local Ray; then the same
    trial with the corpus as JSONL, in this process: the same metrics, to the last bit."""
    passages, questions = tiny_rows()
    data = TINY_SPEC["data"] | {"source": "jsonl", "path": _jsonl(tmp_path / "q.jsonl", questions)}
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(
        yaml.safe_dump(
            TINY_SPEC
            | {
                "name": f"corpus-{uuid.uuid4().hex[:8]}",
                "methods": ["ft_embed"],
                "search": {"lr_embedder": [1e-3]},
                "data": data | {"corpus_path": _parquet(tmp_path / "c.parquet", passages)},
            }
        )
    )
    spec = load_spec(spec_file)
    storage_url = f"sqlite:///{tmp_path / 'studies.db'}"
    summary = launch(spec, storage_url=storage_url, runs_dir=tmp_path / "runs", cache_dir=cache_dir)
    assert summary.ran == {"ft_embed": 1}
    study = optuna.load_study(study_name=f"{spec.name}/ft_embed", storage=open_storage(storage_url))
    launched = study.best_trial.user_attrs

    jsonl = spec.data.model_copy(update={"corpus_path": _jsonl(tmp_path / "c.jsonl", passages)})
    config = trial_config(spec, "ft_embed", lr_embedder=1e-3, lr_generator=None)
    threads = torch.get_num_threads()
    torch.set_num_threads(launched["record"]["environment"]["hardware"]["torch_threads"])
    try:
        result = run_trial(config.model_copy(update={"data": jsonl}), cache_dir=cache_dir)
    finally:
        torch.set_num_threads(threads)
    quality = ("em", "f1", "recall_at_k")
    assert {k: result.metrics[k] for k in quality} == {k: launched["metrics"][k] for k in quality}
    assert result.record["final_losses"] == launched["record"]["final_losses"]
    assert result.record["data_fingerprint"] == launched["record"]["data_fingerprint"]
