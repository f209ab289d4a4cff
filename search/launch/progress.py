"""A live view of a launch: each stage's trials done / running / failed, best so far, time left."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

from rich.console import Console
from rich.live import Live
from rich.table import Table

from search.launch.dispatch import StageEvent
from search.launch.encode import EncodeProgress
from search.plan import Plan
from search.store import rung_text

__all__ = ["LaunchProgress", "encode_reporter"]

# Seconds between two lines of an encode's progress (the first and last are always printed).
_ENCODE_LINE_S = 10.0


def encode_reporter(console: Console) -> Callable[[EncodeProgress], None]:
    """Prints where an encode stands: a line as it starts, every few seconds, and at the end."""
    last_line = [-_ENCODE_LINE_S]

    def report(progress: EncodeProgress) -> None:
        now = time.perf_counter()
        done = progress.done_passages == progress.passages
        if now - last_line[0] < _ENCODE_LINE_S and not done and progress.encoded_passages:
            return
        last_line[0] = now
        console.print(_encode_line(progress), highlight=False, soft_wrap=True)

    return report


def _encode_line(progress: EncodeProgress) -> str:
    stamp = time.strftime("%H:%M:%S")
    if not progress.encoded_passages and progress.done_passages < progress.passages:
        resumed = f", {progress.resumed_shards} already encoded" if progress.resumed_shards else ""
        return (
            f"{stamp} encoding {progress.passages:,} passages in {progress.shards} shards "
            f"on {progress.workers} Ray workers{resumed}"
        )
    share = progress.done_passages / max(progress.passages, 1)
    left = progress.seconds_left
    remaining = "" if left is None or not left else f", ~{left / 60:.1f} min left"
    return (
        f"{stamp} encoded {progress.done_passages:,}/{progress.passages:,} passages "
        f"({share:.0%}), {progress.passages_per_s:,.0f} passages/s{remaining}"
    )


@dataclass
class _StageState:
    total: int = 0
    done: int = 0
    running: int = 0
    failed: int = 0
    best: float | None = None
    status: str = "waiting"


@dataclass
class LaunchProgress:
    """Receives :class:`StageEvent` from ``launch`` and redraws a table with rich."""

    plan: Plan
    objective: str
    maximize: bool
    console: Console
    _states: dict[str, _StageState] = field(default_factory=dict)
    _started: float = field(default_factory=time.perf_counter)
    # The pace is measured from the first trial's start: encoding the index before it (20 min for
    # HotPotQA's passages on a loaded CPU) is no trial's work.
    _first_trial: float | None = None
    _live: Live | None = None

    def __enter__(self) -> LaunchProgress:
        self._states = {stage.name: _StageState(total=stage.n_trials) for stage in self.plan.stages}
        # A redrawn table only reaches a terminal; a log file (nohup, a batch job) gets a line per
        # event instead, and the table once at the end.
        if self.console.is_terminal:
            self._live = Live(
                self._table(), console=self.console, refresh_per_second=2, transient=False
            )
            self._live.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._live is not None:
            self._live.update(self._table())
            self._live.__exit__(exc_type, exc, traceback)
        else:
            self.console.print(self._table())

    def __call__(self, event: StageEvent) -> None:
        if event.kind in ("database_down", "database_back"):
            self._database(event)
            return
        state = self._states[event.stage.name]
        if event.kind == "stage":
            state.status = "running" if event.n_trials else "complete already"
            state.total = event.n_trials
        elif event.kind == "trial_start":
            state.running += 1
            self._first_trial = self._first_trial or time.perf_counter()
        elif event.kind == "trial_end":
            state.running = max(0, state.running - 1)
            state.done += 1
            state.failed += event.failed
            if event.objective is not None and (
                state.best is None or (event.objective > state.best) == self.maximize
            ):
                state.best = event.objective
        elif event.kind == "stage_end" and event.blocked:
            state.status = "blocked"
        elif event.kind == "stage_end" and state.status == "running":
            state.status = "done"
        if self._live is not None:
            self._live.update(self._table())
        elif event.kind in ("stage", "trial_end") or event.blocked:
            self._log(event, state)

    def _database(self, event: StageEvent) -> None:
        """One line when the database goes, one when it is back, in a log and above a live table."""
        stamp = time.strftime("%H:%M:%S")
        if event.kind == "database_down":
            wait = f"{event.wait_s / 60:.0f} min" if event.wait_s >= 60 else f"{event.wait_s:.0f} s"
            line = (
                f"{stamp} database unreachable ({event.database_error}); the trials go on, and "
                f"the launch waits up to {wait} for it to store their results"
            )
        else:
            line = f"{stamp} database back after {event.wait_s:.0f} s; the launch goes on"
        self.console.print(line, highlight=False, soft_wrap=True, markup=False)  # driver text

    def _log(self, event: StageEvent, state: _StageState) -> None:
        stamp = time.strftime("%H:%M:%S")
        if event.kind == "stage":
            trials = f"{state.total} trial" + ("" if state.total == 1 else "s")
            self.console.print(f"{stamp} stage {event.stage.name}: {state.status}, {trials}")
            return
        if event.blocked:
            self.console.print(
                f"{stamp} stage {event.stage.name}: blocked, {event.blocked}",
                highlight=False,
                soft_wrap=True,
            )
            return
        if event.failed:
            result = "failed"
        elif event.pruned_at:
            result = f"stopped early ({rung_text(event.pruned_at)})"
        else:
            result = (
                "done" if event.objective is None else f"{self.objective} {event.objective:.4g}"
            )
        best = "-" if state.best is None else f"{state.best:.4g}"
        self.console.print(
            f"{stamp} stage {event.stage.name}: trial {state.done}/{state.total} {result} "
            f"(best {best}); elapsed {(time.perf_counter() - self._started) / 60:.1f} min "
            f"{self._remaining()}",
            highlight=False,
            soft_wrap=True,  # one line per event in a log, whatever its width
        )

    def _table(self) -> Table:
        elapsed = time.perf_counter() - self._started
        table = Table(
            title=f"ragsweep launch  elapsed {elapsed / 60:.1f} min  {self._remaining()}",
            title_justify="left",
        )
        for column in ("stage", "status", "done", "running", "failed", f"best {self.objective}"):
            table.add_column(column, justify="left" if column in ("stage", "status") else "right")
        for name, state in self._states.items():
            best = "-" if state.best is None else f"{state.best:.4g}"
            table.add_row(
                name,
                state.status,
                f"{state.done}/{state.total}",
                str(state.running),
                str(state.failed),
                best,
            )
        return table

    def _remaining(self) -> str:
        # Work is weighed in forecast trial-seconds, a running trial counted half done; what is
        # left is the launch's forecast share of it until a trial finishes, then the pace
        # measured so far (elapsed per unit of work done).
        if self.plan.forecast_s is None:
            return ""
        per_trial = {stage.name: stage.trial_forecast_s or 0.0 for stage in self.plan.stages}
        active = {name: s for name, s in self._states.items() if s.status != "blocked"}
        done = sum(per_trial[name] * (s.done + s.running / 2) for name, s in active.items())
        left = sum(per_trial[name] * max(0, s.total - s.done) for name, s in active.items())
        left -= sum(per_trial[name] * s.running / 2 for name, s in active.items())
        if any(s.done for s in active.values()):
            estimate = (time.perf_counter() - (self._first_trial or self._started)) * left / done
        else:
            planned = sum(per_trial[stage.name] * stage.n_trials for stage in self.plan.stages)
            estimate = self.plan.forecast_s * left / max(planned, 1e-9)
        return f"remaining ~{estimate / 60:.1f} min (forecast)"
