"""Compute cost of a trial, per phase and in total.

FLOPs are analytic, from parameter counts (the usual 2·N per token forward):
- a forward pass through a model of N parameters costs 2·N·tokens;
- full training adds the backward pass, 4·N·tokens (gradients for activations and weights);
- LoRA training backpropagates through every frozen layer to reach the adapters (2·N·tokens for
  activation gradients) but computes weight gradients only for the N_trainable adapter weights;
- a frozen model whose outputs carry no gradient costs its forward only.
N counts all parameters, embeddings included; attention-score FLOPs (which grow with the square of
the sequence length) are left out, so figures are a slight undercount for long prompts.

Device-seconds are accelerator-seconds on GPU (wall time x devices used) and CPU-seconds of the
process (all threads) on CPU. Peak memory is the CUDA allocator's peak during the phase on GPU and
the process's peak resident set during the phase on CPU: on Linux the high-water mark is reset at
each phase's start (a Ray worker runs many trials, and its mark would otherwise carry the largest
one so far into every later trial); elsewhere it is the process's peak so far.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:  # torch loads where a meter runs: search's plan uses the formulas without it
    import torch

__all__ = ["PhaseCost", "CostMeter", "forward_flops", "training_flops"]


# Token counts are whole in a trial and fractional in a forecast (caps filled in part).
_Tokens = TypeVar("_Tokens", int, float)


def forward_flops(n_params: int, tokens: _Tokens) -> _Tokens:
    """FLOPs of a forward pass over ``tokens`` tokens."""
    return 2 * n_params * tokens


def training_flops(n_params: int, n_trainable: int, tokens: _Tokens) -> _Tokens:
    """FLOPs of forward + backward when ``n_trainable`` of ``n_params`` weights are trained."""
    if n_trainable == 0:
        return forward_flops(n_params, tokens)
    activation_grads = 2 * n_params * tokens
    weight_grads = 2 * n_trainable * tokens
    return forward_flops(n_params, tokens) + activation_grads + weight_grads


@dataclass
class PhaseCost:
    """What one phase (index build, a training phase, evaluation) cost."""

    name: str
    wall_s: float = 0.0
    device_s: float = 0.0
    tokens: int = 0
    flops: int = 0
    peak_mem_mb: float = 0.0
    steps: int = 0
    # RAG objectives: questions per generator forward (training.rag_questions_per_forward, or
    # what fit in training.activation_memory_mb); 0: the whole batch.
    questions_per_forward: int = 0


@dataclass
class CostMeter:
    """Collects a :class:`PhaseCost` for each phase run inside :meth:`phase`."""

    device: torch.device
    phases: list[PhaseCost] = field(default_factory=list)
    # The phase under way, its (wall, process) clocks at its start, and what it cost before
    # (in an earlier process, for a resumed trial).
    _open: tuple[PhaseCost, float, float, PhaseCost] | None = field(default=None, repr=False)

    @contextmanager
    def phase(self, name: str, before: PhaseCost | None = None) -> Iterator[PhaseCost]:
        """Time a phase; the body adds tokens, FLOPs and steps to the yielded record. ``before``:
        what the phase cost in an earlier process (a resumed trial), counted in."""
        import torch

        cost = replace(before, name=name) if before is not None else PhaseCost(name)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _reset_peak_rss()
        self._open = (cost, time.perf_counter(), time.process_time(), before or PhaseCost(name))
        try:
            yield cost
        finally:
            self._clock(*self._open)
            self._open = None
            self.phases.append(cost)

    def costs(self) -> list[PhaseCost]:
        """Every phase's cost so far, a phase under way with what it has cost until now."""
        if self._open is None:
            return list(self.phases)
        return [*self.phases, self._clock(replace(self._open[0]), *self._open[1:])]

    def metrics(self, training_phases: set[str]) -> dict[str, float]:
        """Flat metrics: totals, training-only totals, and ``<phase>.<figure>`` for each phase;
        a phase under way counts with what it has cost so far (a trial stopped part-way)."""
        phases = self.costs()
        metrics: dict[str, float] = {}
        for figure in ("wall_s", "device_s", "tokens", "flops", "steps"):
            metrics[figure] = sum(getattr(cost, figure) for cost in phases)
            metrics[f"train_{figure}"] = sum(
                getattr(cost, figure) for cost in phases if cost.name in training_phases
            )
        metrics["peak_mem_mb"] = max((cost.peak_mem_mb for cost in phases), default=0.0)
        for cost in phases:
            for figure, value in asdict(cost).items():
                if figure != "name":
                    metrics[f"{cost.name}.{figure}"] = value
        return metrics

    def _clock(
        self, cost: PhaseCost, wall_start: float, cpu_start: float, before: PhaseCost
    ) -> PhaseCost:
        """Set ``cost``'s times and peak memory from its start to now, ``before`` added."""
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
        wall_s = time.perf_counter() - wall_start
        cost.wall_s = before.wall_s + wall_s
        cost.device_s = before.device_s + (
            wall_s if self.device.type == "cuda" else time.process_time() - cpu_start
        )
        cost.peak_mem_mb = max(before.peak_mem_mb, _peak_memory_mb(self.device))
        return cost


def _reset_peak_rss() -> None:
    try:  # Linux: "5" resets the process's peak resident set (VmHWM) to its current size
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass  # not Linux, or not allowed: the peak so far is reported instead


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # KiB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (
        peak / 2**20 if sys.platform == "darwin" else peak / 2**10
    )  # bytes on macOS, KiB on Linux
