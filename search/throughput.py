"""The rates a time forecast divides analytic FLOPs by: per GPU, and per CPU by precision and by
whether this CPU has AVX-512 (it stands for the cluster's, as it does for native bf16)."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import TYPE_CHECKING

from trainers import native_bf16

if TYPE_CHECKING:
    from search.spec import StudySpec

__all__ = ["GPU_FLOPS_PER_GPU", "cpu_flops_per_cpu", "throughput_text", "trains_in_bf16"]

# Achieved throughput per CPU that a trial asks Ray for. Measured on a 2-core Xeon (AVX-512, one
# thread a trial): demo trials of SmolLM2-135M (LoRA training, RAG-Token, greedy evaluation) ran
# at 1.0e11 to 1.3e11 FLOP per CPU-second by trainers.cost's count in bf16 autocast (AVX512-BF16),
# and the whole demo study (2 trials at once) at 0.65x its bf16 rate in fp32: the forecasts then
# matched the measured demo, 6.4 min in bf16 and 8.2 min in fp32, within 5%.
_BF16_CPU_FLOPS_PER_CPU = 1e11
_AVX512_FP32_CPU_FLOPS_PER_CPU = 6.5e10
# Any CPU without AVX-512 (AVX2 x86, ARM): measured on a 2-core AMD EPYC with AVX2 only, a PopQA
# ft_gen trial of the same models in fp32 (16 training questions, 16 validation questions, one
# thread, beside two trials of a study): 2.0e10 FLOP per CPU-second training, 2.7e10 evaluating,
# 2.1e10 in all; forecasts at the AVX-512 rate were 3x short on that CPU.
_OTHER_FP32_CPU_FLOPS_PER_CPU = 2.2e10
# An A10-class card (125 TFLOP/s bf16 dense peak) at ~25% utilisation, usual for LoRA/QLoRA
# fine-tuning with short sequences and 4-bit dequantisation (the paper ran on 8 x A10).
GPU_FLOPS_PER_GPU = 3e13


def trains_in_bf16(spec: StudySpec) -> bool:
    """Whether the spec's trials train in bf16 autocast: ``precision: bf16``, or ``auto`` on GPUs
    and on CPUs with native bf16."""
    precision = spec.training.precision
    if precision != "auto":
        return precision == "bf16"
    return spec.resources.gpus > 0 or native_bf16("cpu")


def cpu_flops_per_cpu(bf16: bool) -> float:
    """FLOP per CPU-second a trial (or the index encoding, in fp32) reaches on this CPU."""
    if bf16:
        return _BF16_CPU_FLOPS_PER_CPU
    return _AVX512_FP32_CPU_FLOPS_PER_CPU if _has_avx512() else _OTHER_FP32_CPU_FLOPS_PER_CPU


def throughput_text(spec: StudySpec) -> str:
    """The rate a forecast of ``spec``'s trials assumes, and where it was measured."""
    if spec.resources.gpus > 0:
        return f"{GPU_FLOPS_PER_GPU:.0e} FLOP/s per GPU (A10-class at ~25% of bf16 peak)"
    if trains_in_bf16(spec):
        return f"{_BF16_CPU_FLOPS_PER_CPU:.0e} FLOP/s per CPU (SmolLM2 LoRA in bf16 autocast, measured on a 2-core AVX512-BF16 CPU)"
    where = "an AVX-512 CPU" if _has_avx512() else "an AVX2 CPU (this CPU has no AVX-512)"
    return f"{cpu_flops_per_cpu(False):.1e} FLOP/s per CPU (SmolLM2 LoRA in fp32: no native bf16 here, or precision fp32; measured on {where})"


@functools.cache
def _has_avx512() -> bool:
    """Whether this CPU has AVX-512, from the flags Linux lists (elsewhere: no). Not from torch:
    planning a GPU study loads no torch."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"^flags\s*:.*\bavx512f\b", cpuinfo, re.MULTILINE) is not None
