"""Benchmark 5: RAG-Token and RAG-Sequence batched over the k documents against a loop over them.

Real models of the demo spec (MiniLM + SmolLM2-135M with LoRA) on one training batch: the batched
path scores all B x k single-document prompts in one generator forward; the loop runs k forwards
of B prompts. Prints both losses (they must agree) and the speed-up of forward + backward, for the
spec's training batch and for one question (where a forward of k rows against k of one row shows
the per-call overhead that batching saves).
Run: .venv/bin/python benchmarks/batched_rag.py [--spec studies/demo.yaml] [--repeats 3]
[--device cpu|cuda] (fp32 on both, so that the two losses can be compared exactly).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from _common import device_name, synchronize

from search.spec import load_spec, trial_config
from trainers.cost import CostMeter
from trainers.losses import rag_sequence_loss, rag_token_loss, retrieval_logprobs
from trainers.trial import build_pipeline


def _loss(pipeline, records, objective: str, batched: bool) -> torch.Tensor:
    questions = [record.question for record in records]
    answers = [record.answers[0] for record in records]
    retrieved = pipeline.retrieve(questions)
    documents = retrieved.documents(pipeline.index)
    k = pipeline.training.k
    if batched:
        prompts = [
            pipeline.prompts.prompt(q, [d])
            for q, docs in zip(questions, documents, strict=True)
            for d in docs
        ]
        logprobs, mask, _ = pipeline.answer_logprobs(
            prompts, [a for a in answers for _ in range(k)]
        )
        answer_logprobs, answer_mask = (
            logprobs.view(len(records), k, -1),
            mask.view(len(records), k, -1)[:, 0],
        )
    else:
        per_document = []
        for z in range(k):
            prompts = [
                pipeline.prompts.prompt(q, [docs[z]])
                for q, docs in zip(questions, documents, strict=True)
            ]
            logprobs, mask, _ = pipeline.answer_logprobs(prompts, answers)
            per_document.append(logprobs)
        answer_logprobs, answer_mask = torch.stack(per_document, dim=1), mask  # (B, k, T), (B, T)
    doc_logprobs = retrieval_logprobs(
        pipeline.doc_scores(retrieved), pipeline.training.retrieval_temperature
    )
    loss_fn = rag_token_loss if objective == "rag_token" else rag_sequence_loss
    return loss_fn(doc_logprobs, answer_logprobs, answer_mask)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", type=Path, default=Path("studies/demo.yaml"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = load_spec(args.spec, {"training.precision": "fp32"})  # exact comparison of the losses
    config = trial_config(spec, "rag_token", lr_embedder=1e-5, lr_generator=1e-4)
    cache_dir = Path(os.environ.get("RAGSWEEP_CACHE", Path.home() / ".cache" / "ragsweep"))
    data, pipeline = build_pipeline(config, cache_dir=cache_dir, meter=CostMeter(device))
    print(f"device {device_name(device)}, fp32, {torch.get_num_threads()} torch threads")
    for batch in (spec.training.batch_size_generator, 1):
        _compare(pipeline, data.train[:batch], spec.training.k, args.repeats, device)


def _compare(pipeline, records, k: int, repeats: int, device: torch.device) -> None:
    """Print batched against looped forward + backward time and loss, for both objectives."""
    for objective in ("rag_token", "rag_sequence"):
        seconds, losses = {}, {}
        for batched in (True, False):
            times = []
            for _ in range(repeats + 1):  # the first, untimed: CUDA kernels load and tune on it
                synchronize(device)
                start = time.perf_counter()
                loss = _loss(pipeline, records, objective, batched)
                loss.backward()
                synchronize(device)
                times.append(time.perf_counter() - start)
                pipeline.embedder.zero_grad(set_to_none=True)
                pipeline.generator.model.zero_grad(set_to_none=True)
            seconds[batched], losses[batched] = min(times[1:]), loss.item()
        print(
            f"{objective}, batch {len(records)}: batched {seconds[True]:.2f} s, loop over k={k} "
            f"{seconds[False]:.2f} s, "
            f"speed-up {seconds[False] / seconds[True]:.2f}x; loss batched {losses[True]:.6f} loop {losses[False]:.6f} "
            f"(|diff| {abs(losses[True] - losses[False]):.1e})"
        )


if __name__ == "__main__":
    main()
