"""Benchmark: how long real prompts are, against the length the memory and time forecasts assume.

trainers.memory sizes a trial's activations from its token caps filled to ``training.prompt_fill``:
a launch measures it on the training questions (``trainers.prompts.prompt_fill``, the 90th
percentile of 64 prompts), and a plan made without the data assumes the demo's ``CAP_FILL``. This
builds the evaluation prompt a trial builds for every validation question
(``trainers.prompts.prompt_lengths``: the spec's template, its gold passages first, then the
corpus's next ones up to k), tokenizes it with the generator's tokenizer and prints, per data set,
the validation prompts' 90th percentile of prompt + answer tokens (a batch pads to its long rows),
the forecast's ``concat_prompt`` at CAP_FILL and at the measured fill, and the ratio of the real
length to each (above 1: the forecast is low). The PopQA and HotPotQA samples are read from
../shared/data when they are there.
Run: .venv/bin/python benchmarks/prompt_fill.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from _common import setup_environment

from search.spec import load_spec
from trainers.data import load_data
from trainers.memory import token_caps
from trainers.prompts import PromptBuilder, prompt_fill, prompt_lengths

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DATA_SETS = {
    "demo": ("demo", None),
    "popqa": ("popqa-cpu", SHARED_DATA / "popqa_hipporag2_subset" / "popqa.json"),
    "hotpotqa": ("hotpotqa-cpu", SHARED_DATA / "hotpotqa_ircot_dev500" / "dev_subsampled.jsonl"),
}


def main() -> None:
    cache_dir = setup_environment()
    import torch

    from trainers.models import load_generator

    root = Path(__file__).resolve().parents[1]
    print(
        f"{'data':<9} {'questions':>9} {'p90 tokens':>10} {'fill':>6} "
        f"{'at CAP_FILL':>11} {'ratio':>6} {'at fill':>8} {'ratio':>6}"
    )
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
        training = spec.training
        data = load_data(spec.data)
        prompts = PromptBuilder.for_training(tokenizer, training)
        lengths = prompt_lengths(data.validation, data.corpus, prompts, training)
        real = float(np.percentile(lengths, 90))
        fill = prompt_fill(data.train, data.corpus, prompts, training)
        assumed = token_caps(training).concat_prompt
        measured = token_caps(training.model_copy(update={"prompt_fill": fill})).concat_prompt
        print(
            f"{name:<9} {len(data.validation):>9} {real:>10.0f} {fill:>6.3f} {assumed:>11.0f} "
            f"{real / assumed:>6.2f} {measured:>8.0f} {real / measured:>6.2f}"
        )


if __name__ == "__main__":
    main()
