"""Benchmark: how full real prompts are, against what the memory and time forecasts assume.

trainers.memory sizes a trial's activations from its token caps filled to ``CAP_FILL`` (measured
on the demo's data). This builds the evaluation prompts a trial builds (``PromptBuilder``: the
spec's template, each passage cut to ``max_doc_tokens``, the question to ``max_question_tokens``)
for each validation question, with its gold passages first and the corpus's next passages after
them up to k (retrieval picks other passages, of the same corpus's lengths), tokenizes them with
the generator's tokenizer and prints, per data set, the mean prompt + answer tokens, the
forecast's ``token_caps(...).concat_prompt``, and their ratio (above 1: the forecast is low).
The PopQA and HotPotQA samples are read from ../shared/data when they are there.
Run: .venv/bin/python benchmarks/prompt_fill.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from _common import setup_environment
from transformers import PreTrainedTokenizerBase

from search.spec import StudySpec, load_spec
from trainers.corpus import Document
from trainers.data import load_data
from trainers.memory import token_caps
from trainers.prompts import PromptBuilder

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DATA_SETS = {
    "demo": ("demo", None),
    "popqa": ("popqa-cpu", SHARED_DATA / "popqa_hipporag2_subset" / "popqa.json"),
    "hotpotqa": ("hotpotqa-cpu", SHARED_DATA / "hotpotqa_ircot_dev500" / "dev_subsampled.jsonl"),
}


def _prompt_tokens(spec: StudySpec, tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """Prompt + first answer tokens of each validation question's evaluation prompt."""
    data = load_data(spec.data)
    training = spec.training
    builder = PromptBuilder(
        tokenizer,
        training.prompt_template,
        max_doc_tokens=training.max_doc_tokens,
        max_question_tokens=training.max_question_tokens,
    )
    lengths = []
    for question in data.validation:
        rows = [int(row) for row in data.corpus.lookup(question.gold_doc_ids) if row >= 0]
        after = max(rows, default=-1) + 1
        rows += [row % len(data.corpus) for row in range(after, after + training.k)]
        documents: list[Document] = data.corpus.documents(rows[: training.k])
        prompt = builder.prompt(question.question, documents)
        answer = tokenizer(question.answers[0], add_special_tokens=False).input_ids
        prompt_ids = tokenizer(prompt).input_ids
        lengths.append(len(prompt_ids) + min(len(answer), training.max_answer_tokens))
    return np.asarray(lengths)


def main() -> None:
    cache_dir = setup_environment()
    import torch

    from trainers.models import load_generator

    root = Path(__file__).resolve().parents[1]
    print(f"{'data':<9} {'questions':>9} {'tokens (mean)':>14} {'forecast':>9} {'ratio':>6}")
    tokenizer = None
    for name, (spec_name, path) in DATA_SETS.items():
        if path is not None and not path.exists():
            print(f"{name:<9} skipped: {path} not present")
            continue
        overrides: dict[str, object] = {} if path is None else {"data.path": str(path)}
        spec = load_spec(root / "studies" / f"{spec_name}.yaml", overrides)
        if tokenizer is None:  # every spec here names the same generator
            tokenizer = load_generator(
                spec.models.generator, cache_dir=cache_dir, device=torch.device("cpu")
            ).tokenizer
        lengths = _prompt_tokens(spec, tokenizer)
        mean, forecast = lengths.mean(), token_caps(spec.training).concat_prompt
        print(f"{name:<9} {len(lengths):>9} {mean:>14.0f} {forecast:>9.0f} {mean / forecast:>6.2f}")


if __name__ == "__main__":
    main()
