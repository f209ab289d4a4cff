"""The launch lease: which launch runs a study now, so that two never run it at once.

While a launch runs, every stage study it works on carries ``ragsweep.launch``: who runs it (host,
pid, process start time) and a heartbeat. A second launch of the same spec is refused while that
launch is alive, and the trials a dead launch left RUNNING are failed (retryable) by the next one.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import optuna
import psutil

from search.launch._optuna_search import unreachable
from search.store import GROUP_ATTR, fail_running_trials
from trainers.errors import ConfigError

__all__ = [
    "LAUNCH_ATTR",
    "LaunchOwner",
    "check_not_running",
    "claim_studies",
    "fail_abandoned_trials",
    "heartbeat_studies",
    "live_launch",
    "release_studies",
]

LAUNCH_ATTR = "ragsweep.launch"
# A launch on another host counts as dead once its heartbeat is this old (clocks may differ by a
# little; a heartbeat is written every few tens of seconds).
_STALE_AFTER_S = 300.0


class LaunchOwner(dict[str, Any]):
    """Who runs a launch: ``id``, ``host``, ``pid``, ``pid_started`` and the last ``heartbeat``."""

    @classmethod
    def this_process(cls) -> LaunchOwner:
        return cls(
            id=uuid.uuid4().hex,
            host=socket.gethostname(),
            pid=os.getpid(),
            pid_started=psutil.Process().create_time(),
            heartbeat=time.time(),
        )

    def describe(self) -> str:
        return f"pid {self.get('pid')} on {self.get('host')}"


def live_launch(
    studies: Iterable[optuna.Study], *, stale_after_s: float = _STALE_AFTER_S
) -> LaunchOwner | None:
    """The launch that is running these studies now, if one holds them and is still alive."""
    for study in studies:
        owner = study.user_attrs.get(LAUNCH_ATTR)
        if owner and _alive(owner, stale_after_s):
            return LaunchOwner(owner)
    return None


def check_not_running(
    studies: Sequence[optuna.Study],
    *,
    owner: LaunchOwner | None = None,
    stale_after_s: float = _STALE_AFTER_S,
) -> None:
    """Refuse when a live launch other than ``owner`` holds one of the studies."""
    other = live_launch(studies, stale_after_s=stale_after_s)
    if other is not None and (owner is None or other["id"] != owner["id"]):
        group = studies[0].user_attrs.get(GROUP_ATTR, studies[0].study_name)
        raise ConfigError(
            f"study '{group}' is being run by another launch ({other.describe()}); wait for it "
            "to finish or stop it, then launch again (or use another name)"
        )


def claim_studies(
    studies: Sequence[optuna.Study], owner: LaunchOwner, *, stale_after_s: float = _STALE_AFTER_S
) -> None:
    """Mark the studies as run by ``owner``; refuse when another live launch holds one of them."""
    check_not_running(studies, owner=owner, stale_after_s=stale_after_s)
    heartbeat_studies(studies, owner)
    # Two launches that checked at the same moment both wrote; the later write wins, and the
    # other launch sees it here and backs off.
    check_not_running(studies, owner=owner, stale_after_s=stale_after_s)


def heartbeat_studies(studies: Iterable[optuna.Study], owner: LaunchOwner) -> None:
    """Refresh ``owner``'s heartbeat on the studies it runs."""
    owner["heartbeat"] = time.time()
    for study in studies:
        study.set_user_attr(LAUNCH_ATTR, dict(owner))


def release_studies(studies: Iterable[optuna.Study], owner: LaunchOwner) -> None:
    """Clear the claim of ``owner`` (Optuna cannot delete an attribute; it is set to null).

    A database that cannot be reached keeps the claim: it lapses by itself, at once on this host
    (the process is gone) and elsewhere once its heartbeat is stale, and the launch's own error,
    if any, is the one to show."""
    try:
        for study in studies:
            current = study.user_attrs.get(LAUNCH_ATTR)
            if current and current.get("id") == owner["id"]:
                study.set_user_attr(LAUNCH_ATTR, None)
    except Exception as e:
        if not unreachable(e):
            raise
        logging.getLogger(__name__).debug(
            "claim left in place: database unreachable", exc_info=True
        )


def fail_abandoned_trials(study: optuna.Study, previous: dict[str, Any] | None) -> list[int]:
    """Fail (retryable) the trials a dead launch left RUNNING; call only while holding a claim.

    The reason names the launch that left them when the study still records it.
    """
    who = f" ({LaunchOwner(previous).describe()})" if previous else ""
    return fail_running_trials(
        study,
        f"the launch running this trial{who} stopped before it finished (driver killed, "
        "or its machine lost); launching the spec again re-runs it, from its last resume point "
        "if it saved one",
    )


def _alive(owner: dict[str, Any], stale_after_s: float) -> bool:
    """A launch on this host is alive while its process is; elsewhere, while it heartbeats."""
    if owner.get("host") == socket.gethostname():
        try:
            process = psutil.Process(int(owner["pid"]))
            # The start time tells a reused pid apart from the launch's own process.
            return bool(
                process.status() != psutil.STATUS_ZOMBIE
                and abs(process.create_time() - float(owner["pid_started"])) < 1.0
            )
        except (psutil.Error, KeyError, ValueError):
            return False
    return time.time() - float(owner.get("heartbeat", 0.0)) < stale_after_s
