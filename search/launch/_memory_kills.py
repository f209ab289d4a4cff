"""Trials Ray's memory monitor kills: Tune is told of a dead trial worker, the searcher that it was
memory, so that only that trial fails and it re-runs with fewer trials beside it.

Ray reports the tasks of an actor its memory monitor killed as ``ray.exceptions.OutOfMemoryError``
(the actor's death cause is an OOM context), not as the ``RayActorError`` of any other dead actor.
Tune's actor manager handles only ``RayActorError`` and ``RayTaskError`` and raises
``RuntimeError("Caught unexpected exception")`` on anything else
(``ray/air/execution/_internal/actor_manager.py``, ``RayActorManager._actor_task_failed``, Ray
2.60): one memory kill ended the whole Tune run, and the trials running beside the killed one
with it.
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Callable, Iterator
from typing import Any

from ray import cloudpickle
from ray.exceptions import OutOfMemoryError, RayActorError
from ray.tune.schedulers import FIFOScheduler

# The RayActorManager callbacks that receive a dead actor's error: its creation (``__init__``)
# failed, or one of its tasks (train, reset for reuse, stop) did.
_DEATH_CALLBACKS = ("_actor_start_failed", "_actor_task_failed")


class KilledForMemory(RayActorError):
    """A trial worker killed by Ray's memory monitor, as the actor death Tune handles; the message
    is Ray's (node memory used, the threshold, the workers killed)."""

    def __init__(self, message: str = "") -> None:
        super().__init__(error_msg=message)


@contextlib.contextmanager
def memory_kills_as_actor_deaths() -> Iterator[None]:
    """While Tune runs, hand it each memory kill as a :class:`KilledForMemory` actor death: Tune
    then fails (and the searcher re-runs) that trial alone, as for any other dead worker."""
    # Where a later Ray changed these internals nothing is translated: a memory kill then ends
    # the Tune run, whose running trials _run_tuner re-runs (the memory-kill test fails on it).
    manager = _actor_manager()
    originals = {
        name: getattr(manager, name) for name in _DEATH_CALLBACKS if hasattr(manager, name)
    }
    for name, original in originals.items():
        setattr(manager, name, _translating(original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(manager, name, original)


def _actor_manager() -> Any:
    """Tune's actor manager class (Ray 2.60), or None where a later Ray moved it."""
    try:
        from ray.air.execution._internal.actor_manager import RayActorManager
    except ImportError:
        return None
    return RayActorManager


def _translating(callback: Callable[..., Any]) -> Callable[..., Any]:
    # Ray passes the error by keyword: callback(tracked_actor[_task]=..., exception=...).
    def translated(self: Any, *args: Any, **kwargs: Any) -> Any:
        exception = kwargs.get("exception")
        if isinstance(exception, OutOfMemoryError):
            kwargs["exception"] = KilledForMemory(str(exception))
        return callback(self, *args, **kwargs)

    return translated


class MemoryKillReports(FIFOScheduler):
    """Tune's default (FIFO) scheduling; tells ``on_kill(trial_id, Ray's message)`` which failed
    trials Ray's memory monitor killed. Tune tells its scheduler of a failure before its searcher,
    so the searcher knows the cause when it records the trial."""

    def __init__(self, on_kill: Callable[[str, str], None]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # Ray leaves it unannotated
        self._on_kill = on_kill

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        error = _last_error(trial)
        if isinstance(error, KilledForMemory):
            self._on_kill(trial.trial_id, str(error))


def _last_error(trial: Any) -> BaseException | None:
    """The error Tune recorded last for ``trial``: it pickles an actor death to the trial's local
    folder as it handles it, before telling the scheduler."""
    path = trial.pickled_error_file
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            error = cloudpickle.load(f)
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ImportError):
        return None  # not an error this module made: the caller treats the death as unexplained
    return error if isinstance(error, BaseException) else None
