"""Cost metering: per-phase peak memory on CPU."""

from __future__ import annotations

import sys

import pytest
import torch

from trainers.cost import CostMeter


@pytest.mark.skipif(sys.platform != "linux", reason="the per-phase peak needs Linux's VmHWM reset")
def test_cpu_peak_memory_is_each_phases_own_not_the_process_peak_so_far():
    meter = CostMeter(torch.device("cpu"))
    with meter.phase("large"):
        block = torch.ones(256 * 2**20, dtype=torch.uint8)  # 256 MiB, touched
        del block
    with meter.phase("small"):
        small = torch.ones(2**20, dtype=torch.uint8)
        del small
    large, small = meter.phases
    # A reused Ray worker would otherwise report its largest trial's peak in every later trial.
    assert large.peak_mem_mb - small.peak_mem_mb > 200
