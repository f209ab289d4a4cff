"""Benchmark 6: FLOP/s of a generator training step against the device's dense matmul FLOP/s.

SmolLM2-135M-Instruct, loaded by `trainers.models.load_generator` as the trainers load it, trains
on one batch of 8 sequences x 128 tokens of the demo corpus (causal-LM loss over every token),
with the trainers' step: forward, backward, gradient clipping, AdamW step, zero_grad; under bf16
autocast when the precision is bf16, as trainers do. Step FLOPs are the analytic count of
`trainers.cost.training_flops` (full: 6·N per token; LoRA: 4·N + 2·N_trainable). In the same run,
the dense matrix-multiply rate torch reaches on the device in the same dtype is measured on square
matrices. Printed: median step time and FLOP/s for full fine-tuning and LoRA (rank 16), the matmul
rate, and each fraction (target at least 0.3 for full fine-tuning).
Run: .venv/bin/python benchmarks/trainer_efficiency.py [--device cpu|cuda] [--precision fp32|bf16]
[--batch 8] [--sequence 128] (a GPU needs larger steps than the reference one to fill it)
(defaults: fp32 on CPU, bf16 on CUDA; CPU uses torch's default threads, one per core).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from _common import (
    device_name,
    load_average,
    reduced_spec,
    setup_environment,
    synchronize,
)
from transformers import PreTrainedTokenizerBase

from trainers.cost import training_flops
from trainers.data import load_data
from trainers.encode import passage_text
from trainers.models import load_generator, parameter_counts

_BATCH, _SEQUENCE = 8, 128  # the reference step of a SmolLM2 LoRA batch: 8 x 128 tokens


def _timed(run: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one untimed warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _matmul_flops_per_s(device: torch.device, dtype: torch.dtype, size: int, repeats: int) -> float:
    """Dense square matmul rate: 2·size³ FLOPs per multiply."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = _timed(lambda: torch.mm(a, b), device, repeats)
    return 2 * size**3 / seconds


def _token_batch(tokenizer: PreTrainedTokenizerBase, batch: int, sequence: int) -> torch.Tensor:
    """(batch, sequence) token ids cut from the demo corpus, so no row holds padding."""
    corpus = load_data(reduced_spec().data).corpus
    text = "\n".join(passage_text(document) for document in corpus.documents(range(200)))
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    # A batch larger than the 200 passages' tokens repeats them: the cost, not the text, counts.
    ids = ids.repeat(math.ceil(batch * sequence / len(ids)))
    return ids[: batch * sequence].view(batch, sequence)


def _step_seconds(
    finetune: str,
    device: torch.device,
    autocast: torch.dtype | None,
    cache_dir: Path,
    repeats: int,
    shape: tuple[int, int],
) -> tuple[float, int]:
    """Median seconds of one training step, and the step's analytic FLOPs."""
    generator = load_generator(
        "smollm2-135m", cache_dir=cache_dir, device=device, finetune=finetune, lora_rank=16
    )
    model = generator.model
    model.train()
    input_ids = _token_batch(generator.tokenizer, *shape).to(device)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-6)  # tiny: the step's cost, not its effect

    def step() -> None:
        context = (
            torch.autocast(device.type, dtype=autocast) if autocast is not None else nullcontext()
        )
        with context:
            loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = _timed(step, device, repeats)
    total, trainable = parameter_counts(model)
    return seconds, training_flops(total, trainable, input_ids.numel())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per mode")
    parser.add_argument("--batch", type=int, default=_BATCH, help="sequences per step")
    parser.add_argument("--sequence", type=int, default=_SEQUENCE, help="tokens per sequence")
    args = parser.parse_args()
    cache_dir = setup_environment()
    device = torch.device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    autocast = torch.bfloat16 if precision == "bf16" else None
    # Large enough to be compute-bound: a 4096 bf16 multiply is ~0.1 ms on a big GPU.
    size = 8192 if device.type == "cuda" else 2048

    load_before = load_average()
    matmul = _matmul_flops_per_s(device, dtype, size, repeats=10)
    steps = {
        finetune: _step_seconds(
            finetune, device, autocast, cache_dir, args.repeats, (args.batch, args.sequence)
        )
        for finetune in ("full", "lora")
    }
    # Measured again after the steps: the lower of the two is taken, so load that fell on one
    # measurement of the peak does not flatter the fraction.
    matmul = min(matmul, _matmul_flops_per_s(device, dtype, size, repeats=10))
    load_after = load_average()

    threads = torch.get_num_threads()
    print(
        f"device {device_name(device)} ({threads} torch threads), {precision}; SmolLM2-135M, batch "
        f"{args.batch} x {args.sequence} tokens, median of {args.repeats} steps"
    )
    print(f"load average: before {load_before}; after {load_after}")
    print(f"dense matmul {size}x{size} {precision}: {matmul / 1e9:.1f} GFLOP/s")
    for finetune, (seconds, flops) in steps.items():
        achieved = flops / seconds
        target = " (target >= 0.3)" if finetune == "full" else ""
        print(
            f"{finetune}: step {seconds:.2f} s, {flops / 1e9:.0f} GFLOP, {achieved / 1e9:.1f} GFLOP/s, "
            f"fraction of matmul rate {achieved / matmul:.2f}{target}"
        )


if __name__ == "__main__":
    main()
