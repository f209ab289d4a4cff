"""Benchmark: evaluating a trial on retrieval alone against generating its answers.

``training.evaluate: retrieval`` (studies of the embedder, e.g. studies/popqa-embedder.yaml)
retrieves each validation question's top-k and scores Recall@k; ``answers`` also generates an
answer from the five-passage prompt and scores EM and F1. This builds popqa-embedder's pipeline
(baseline models, the PopQA sample from ../shared/data) once, evaluates the same validation
questions both ways on one CPU thread in fp32, and prints each one's CPU seconds, their ratio and
the Recall@5 of each (the same passages are retrieved, so it must match).
Run: .venv/bin/python benchmarks/retrieval_eval.py [questions, default 32]
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from _common import load_average, setup_environment

from search.spec import load_spec, trial_config
from trainers.cost import CostMeter
from trainers.evaluate import evaluate_pipeline
from trainers.trial import build_pipeline

POPQA = Path(__file__).resolve().parents[2] / "shared" / "data" / "popqa_hipporag2_subset"


def main() -> None:
    cache_dir = setup_environment()
    import torch

    questions = int(sys.argv[1]) if len(sys.argv) > 1 else 32
    if not (POPQA / "popqa.json").exists():
        sys.exit(f"skipped: {POPQA / 'popqa.json'} not present")
    torch.set_num_threads(1)  # as a trial worker of resources.cpus 1
    root = Path(__file__).resolve().parents[1]
    spec = load_spec(
        root / "studies" / "popqa-embedder.yaml",
        {
            "data.path": str(POPQA / "popqa.json"),
            "data.n_validation": questions,
            "data.n_test": 0,
            "training.precision": "fp32",
        },
    )
    config = trial_config(spec, "none", lr_embedder=None, lr_generator=None)
    data, pipeline = build_pipeline(
        config, cache_dir=cache_dir, meter=CostMeter(torch.device("cpu"))
    )
    print(
        f"PopQA sample, {len(data.validation)} validation questions, k = {spec.training.k}, fp32, 1 thread"
    )
    print(f"load average before: {load_average()}")
    seconds: dict[str, float] = {}
    for mode in ("retrieval", "answers"):
        training = pipeline.training.model_copy(update={"evaluate": mode})
        # The meter's process CPU seconds: what a trial reports as eval.device_s.
        meter = CostMeter(torch.device("cpu"))
        with meter.phase("eval") as cost:
            evaluation = evaluate_pipeline(
                dataclasses.replace(pipeline, training=training), data.validation, cost
            )
        seconds[mode] = cost.device_s
        print(
            f"{mode:<9}  {seconds[mode]:8.2f} CPU-s  {seconds[mode] / len(data.validation) * 1000:8.1f} ms/question  "
            f"Recall@5 {evaluation.recall_at_k:.4f}  F1 {'-' if evaluation.f1 is None else f'{evaluation.f1:.4f}'}"
        )
    print(f"answers / retrieval: {seconds['answers'] / seconds['retrieval']:.0f}x the CPU time")


if __name__ == "__main__":
    main()
