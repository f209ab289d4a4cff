"""Re-run a stored trial from its record alone and say whether the metrics came back.

The record (resolved config, seed, data fingerprint, environment) is all that is read: phases an
earlier stage trained and this trial loaded from a checkpoint are trained again from the same
per-phase seed, so a reproduction needs no file from the original run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from search.store import QUALITY_METRICS, TrialRecord, rung_text
from trainers import ConfigError, QuestionResult, TrialConfig, method_phases

__all__ = ["Reproduction", "reproduce_trial", "stored_config"]


@dataclass(frozen=True)
class Reproduction:
    """Recorded against reproduced metrics, the environment drift and where models were saved."""

    trial: TrialRecord
    recorded: dict[str, float]
    reproduced: dict[str, float]
    tolerance: float
    drift: list[tuple[str, str, str]]  # (field, recorded, now)
    saved: dict[str, Path]  # "embedder", "generator", "merged generator" -> folder
    # Questions answered and retrieved for as recorded, of those recorded (None: the trial has
    # no per-question results, or they were not of the same questions).
    same_answers: tuple[int, int] | None = None

    @property
    def differences(self) -> dict[str, float]:
        """Absolute differences of the quality metrics both runs reported."""
        return {
            key: abs(self.reproduced[key] - self.recorded[key])
            for key in QUALITY_METRICS
            if key in self.recorded and key in self.reproduced
        }

    @property
    def matches(self) -> bool:
        return all(diff <= self.tolerance for diff in self.differences.values())


def stored_config(trial: TrialRecord, *, data_path: str | None = None) -> TrialConfig:
    """The config that re-runs ``trial``, from its record alone (the data at ``data_path`` when
    given). A record that cannot re-run it (none stored, not a JSON object, without a config or a
    data fingerprint, or a config this version does not read) is refused in one line naming the
    trial, before anything loads."""
    if trial.pruned_at is not None:
        raise ConfigError(
            f"trial {trial.id} was stopped early ({rung_text(trial.pruned_at)}) and has no "
            "quality figures to compare; reproduce a completed trial (`ragsweep trials --state complete`)"
        )
    record = trial.attributes().get("record")  # as stored
    if record is None:
        reason = f" (it failed: {trial.fail_reason})" if trial.fail_reason else ""
        raise ConfigError(
            f"trial {trial.id} has no stored record{reason}; reproduce a completed trial (`ragsweep trials --state complete`)"
        )
    if not isinstance(record, dict):
        raise ConfigError(
            f"trial {trial.id}'s stored record is not a JSON object (another program wrote it, "
            "or it was edited); reproduce a trial ragsweep recorded "
            "(`ragsweep trials --state complete`)"
        )
    if not trial.config:
        raise ConfigError(
            f'trial {trial.id}\'s record holds no config (a JSON object under "config"); '
            "reproduce a trial ragsweep recorded (`ragsweep trials --state complete`)"
        )
    stored = dict(trial.config)
    stored["reuse"] = {}  # train every phase here; see the module docstring
    if data_path:
        data = stored.get("data")
        stored["data"] = {**(data if isinstance(data, dict) else {}), "path": data_path}
    try:
        config = TrialConfig.model_validate(stored)
    except ValidationError as e:
        error = e.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "config"
        raise ConfigError(
            f"trial {trial.id}'s stored config is not a trial config to this ragsweep ({where}: "
            f"{error['msg']}); reproduce it with the ragsweep version recorded with the trial"
        ) from e
    if trial.data_fingerprint is None:
        raise ConfigError(
            f"trial {trial.id}'s record has no data fingerprint, so its data cannot be checked; "
            "reproduce a trial ragsweep recorded (`ragsweep trials --state complete`)"
        )
    return config


def reproduce_trial(
    trial: TrialRecord,
    config: TrialConfig,
    *,
    cache_dir: Path,
    out_dir: Path | None = None,
    merged: bool = False,
    tolerance: float = 1e-6,
) -> Reproduction:
    """Train and evaluate ``trial`` again with ``config`` (:func:`stored_config`); models go to
    ``out_dir`` when given."""
    import torch

    from trainers import environment_record, load_data, run_trial

    recorded = trial.data_fingerprint or ""
    fingerprint = load_data(config.data).fingerprint
    if fingerprint != recorded:
        raise ConfigError(
            f"the data now reads differently from trial {trial.id}'s (fingerprint {fingerprint[:12]} "
            f"!= recorded {recorded[:12]}); pass --data-path with the file it used"
        )
    environment = trial.environment
    # Float sums depend on how work is split over threads: use the trial's thread count.
    hardware = environment.get("hardware")
    threads = hardware.get("torch_threads") if isinstance(hardware, dict) else None
    if type(threads) is int and threads > 0:
        torch.set_num_threads(threads)
    # The test split where the trial scored it (a launch skips it for a trial that trailed).
    scored = trial.record.get("test_scored", True) is not False
    result = run_trial(
        config,
        cache_dir=cache_dir,
        out_dir=out_dir,
        merge_generator=merged,
        score_test=lambda _validation: scored,
    )
    return Reproduction(
        trial=trial,
        recorded={k: float(trial.metrics[k]) for k in QUALITY_METRICS if k in trial.metrics},
        reproduced={k: float(result.metrics[k]) for k in QUALITY_METRICS if k in result.metrics},
        tolerance=tolerance,
        drift=_drift(environment, environment_record()),
        saved=_saved_models(config, out_dir, merged) if out_dir else {},
        same_answers=_same_answers(trial.questions, result.questions),
    )


def _same_answers(
    recorded: Sequence[QuestionResult] | None, reproduced: Sequence[QuestionResult]
) -> tuple[int, int] | None:
    """(questions with the same prediction and retrieved documents, questions) over the
    recorded questions; None without them or when the questions are not the same."""
    if recorded is None or [q.id for q in recorded] != [q.id for q in reproduced]:
        return None
    same = sum(
        (before.prediction, before.retrieved) == (after.prediction, after.retrieved)
        for before, after in zip(recorded, reproduced, strict=True)
    )
    return same, len(recorded)


def _drift(recorded: dict[str, Any], now: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Fields of the environment record that differ, flattened to dotted names."""
    before, after = _flatten(recorded), _flatten(now)
    return [
        (key, str(before.get(key, "-")), str(after.get(key, "-")))
        for key in sorted(set(before) | set(after))
        if before.get(key) != after.get(key)
    ]


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, inner in value.items():
        flat |= _flatten(inner, f"{prefix}.{key}" if prefix else str(key))
    return flat


def _saved_models(config: TrialConfig, out_dir: Path, merged: bool) -> dict[str, Path]:
    """The folders holding the final embedder and generator: the last phase that trained each."""
    saved: dict[str, Path] = {}
    for phase in method_phases(config.method, config.training):
        if phase.trains_embedder:
            saved["embedder"] = out_dir / phase.name / "embedder"
        if phase.trains_generator:
            saved["generator"] = out_dir / phase.name / "generator"
            if merged:
                saved["merged generator"] = out_dir / phase.name / "generator" / "merged"
    return saved
