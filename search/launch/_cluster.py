"""The Ray cluster a launch runs on: starting or joining it, and refusing a trial no node can hold
before anything is written (Tune would wait for it forever, or start it and see it die)."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import ray

from search.forecast import gib_text, trial_memory_ask
from search.plan import Plan
from search.spec import StudySpec
from trainers.errors import ConfigError, one_line

__all__ = ["check_resources", "ray_session", "start_ray"]


@contextmanager
def ray_session() -> Iterator[None]:
    """Stops, at its end, a Ray started within it; a Ray already running (a notebook's, a test
    session's) is the caller's to stop. Stopping a local Ray ends it; a cluster given by address
    is only disconnected from."""
    ray_was_running = ray.is_initialized()
    try:
        yield
    finally:
        if not ray_was_running:
            ray.shutdown()


def start_ray(address: str | None, log_to_driver: bool) -> None:
    # A failed trial reports its reason and no objective; Tune must pass that on to the searcher,
    # which records it as FAIL, instead of rejecting the result.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # Tune's own Ctrl-C handler ends the stage's run as if it were done, and the launch would go
    # on to the next stage; without it, Ctrl-C stops the whole launch.
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    # A trial early stopping stopped frees its memory and folder as its worker is handed the next
    # trial; Tune gives that 2 s by default, then aborts the next trial (local workers inherit it).
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "60")
    if ray.is_initialized():
        return
    try:
        if address is None:
            # Local Ray stays on loopback and keeps its dashboard off.
            ray.init(
                include_dashboard=False,
                log_to_driver=log_to_driver,
                logging_level=logging.ERROR,
                _node_ip_address="127.0.0.1",
            )
        else:
            _check_reachable(address)
            ray.init(address=address, log_to_driver=log_to_driver, logging_level=logging.ERROR)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ConfigError(
            f"cannot connect to the Ray cluster at '{address}': {one_line(e)}; start it with `ray start --head` or drop --address"
        ) from e


def _check_reachable(address: str) -> None:
    """Fail fast on a HOST:PORT nobody listens on: ray.init would retry it for minutes."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        return  # "auto", ray:// client addresses: Ray resolves those itself
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise ConfigError(
            f"no Ray cluster answers at '{address}' ({one_line(e)}); start it with "
            "`ray start --head` there, fix --address, or drop --address for a local Ray"
        ) from e


def check_resources(spec: StudySpec, plan: Plan) -> None:
    """Refuse a trial no Ray node can hold: Tune would wait for it forever (CPUs, GPUs, memory),
    or start it on a GPU too small and see it die (GPU memory, checked on this machine's GPU)."""
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    for key, name in (("CPU", "cpus"), ("GPU", "gpus")):
        asked = getattr(spec.resources, name)
        largest = max((node.get(key, 0.0) for node in nodes), default=0.0)
        if asked > largest:
            raise ConfigError(
                f"resources.{name} is {asked:g} per trial but the largest Ray node has "
                f"{largest:g} {key}s; lower resources.{name} or add a node that has them"
            )
    largest_memory = max((node.get("memory", 0.0) for node in nodes), default=0.0)
    for stage in plan.stages:
        asked_memory = trial_memory_ask(stage, spec) or 0
        if asked_memory > largest_memory:
            raise ConfigError(
                f"a {stage.name} trial needs {gib_text(asked_memory)} of memory "
                f"({_memory_source(spec)}) but the largest Ray node offers {gib_text(largest_memory)}; "
                f"{_memory_fix(spec)}"
            )
    gpu_bytes = _local_gpu_bytes() if spec.resources.gpus > 0 else None
    if gpu_bytes is not None:
        for stage in plan.stages:
            needed = stage.trial_memory.device_bytes if stage.trial_memory else 0.0
            if needed > gpu_bytes * max(spec.resources.gpus, 1.0):
                raise ConfigError(
                    f"a {stage.name} trial needs {gib_text(needed)} of GPU memory (forecast) but "
                    f"this machine's GPU has {gib_text(gpu_bytes)}; {_memory_fix(spec)}"
                )


def _memory_source(spec: StudySpec) -> str:
    return "resources.memory" if spec.resources.memory is not None else "forecast peak"


def _memory_fix(spec: StudySpec) -> str:
    if spec.resources.memory is not None:
        return "lower resources.memory, or run on a node with more memory"
    return (
        "lower training.activation_memory_mb, training.batch_size_generator or "
        "training.eval_batch_size, keep training.gradient_checkpointing on, or run on a node "
        "with more memory (resources.memory overrides the forecast)"
    )


def _local_gpu_bytes() -> int | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.get_device_properties(0).total_memory)
