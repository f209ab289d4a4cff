"""Resume points: a trial killed part-way and run again continues where it was and ends exactly
as the same trial never stopped, on tiny real models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tiny import tiny_config
from trainers.resume import Resume, load_point
from trainers.rungs import Rung, Rungs
from trainers.trial import TrialResult, run_trial

pytestmark = pytest.mark.xdist_group("test_resume")


class _Killed(Exception):
    """Stands for the process dying: raised from a rung report, it ends the trial there."""


def _kill_at(rung_number: int, heard: list[Rung]) -> Rungs:
    def report(rung: Rung) -> None:
        heard.append(rung)
        if rung.number == rung_number:
            raise _Killed

    return Rungs((0.25, 0.5), 4, report)


def _same_trial(resumed: TrialResult, whole: TrialResult) -> None:
    for name in ("em", "f1", "recall_at_k", "train_steps", "train_tokens", "train_flops"):
        assert resumed.metrics[name] == whole.metrics[name], name
    assert resumed.predictions == whole.predictions
    assert resumed.record["final_losses"] == whole.record["final_losses"]
    assert resumed.record["questions_sha256"] == whole.record["questions_sha256"]
    # The rungs' values and places, as the search heard them (their wall times differ).
    assert [
        {key: value for key, value in rung.items() if key != "wall_s"}
        for rung in resumed.record["rungs"]
    ] == [
        {key: value for key, value in rung.items() if key != "wall_s"}
        for rung in whole.record["rungs"]
    ]


# ft_embed: MNRL mines its negatives with E as the phase started; ft_gen and rag_token: dropout
# draws from torch's generator in the LoRA generator; two_phase (its generator phase trained here)
# is killed in its second phase, after a point between phases.
@pytest.mark.parametrize(
    ("method", "killed_at", "finished", "phase"),
    [
        ("ft_embed", 2, [], "embedder"),
        ("ft_gen", 2, [], "generator"),
        ("rag_token", 2, [], "joint"),
        ("two_phase", 3, ["generator"], None),
    ],
)
def test_a_killed_trial_run_again_ends_as_one_never_stopped(
    method, killed_at, finished, phase, cache_dir, tmp_path
):
    config = tiny_config(method)
    whole = run_trial(config, cache_dir=cache_dir, rungs=Rungs((0.25, 0.5), 4, lambda rung: None))
    resume = Resume(
        tmp_path / "resume", every_s=float("inf")
    )  # points at rungs and phase ends only
    heard_first: list[Rung] = []
    with pytest.raises(_Killed):
        run_trial(
            config, cache_dir=cache_dir, rungs=_kill_at(killed_at, heard_first), resume=resume
        )
    assert (tmp_path / "resume" / "resume.pt").is_file()

    heard: list[Rung] = []
    resumed = run_trial(
        config, cache_dir=cache_dir, rungs=Rungs((0.25, 0.5), 4, heard.append), resume=resume
    )
    _same_trial(resumed, whole)
    # From the point saved at the last rung before the kill, or at the end of the phase before.
    step = heard_first[killed_at - 2].step if phase else None
    assert resumed.record["resumed"] == {"finished_phases": finished, "phase": phase, "step": step}
    assert "resumed" not in whole.record
    # The rungs taken before the kill are heard again, then the rest, each once and in turn.
    assert [rung.number for rung in heard] == [r["rung"] for r in whole.record["rungs"]]
    assert heard[: killed_at - 1] == heard_first[: killed_at - 1]
    assert not (tmp_path / "resume").exists()  # a finished trial leaves no point behind


def test_a_point_every_step_resumes_from_the_last_step(cache_dir, tmp_path):
    """With points due at every step, a trial killed at its second rung resumes from the step
    before it, and its cost so far (steps, FLOPs) carries over into the resumed run."""
    config = tiny_config("ft_gen")
    resume = Resume(tmp_path / "resume", every_s=0.0)
    with pytest.raises(_Killed):
        run_trial(config, cache_dir=cache_dir, rungs=_kill_at(2, []), resume=resume)
    point = load_point(resume, config.model_dump_json())
    assert point is not None and point.phase == "generator" and point.progress is not None
    assert point.progress.step == 1 and point.phase_cost is not None
    assert point.phase_cost.steps == 1 and point.phase_cost.flops > 0
    # The LoRA weights only: the frozen embedder is not copied.
    assert list(point.progress.weights) == ["generator"] and point.progress.weights["generator"]
    assert all(w.dtype == torch.float32 for w in point.progress.weights["generator"].values())


def test_a_point_from_another_config_is_not_taken(cache_dir, tmp_path):
    resume = Resume(tmp_path / "resume", every_s=float("inf"))
    with pytest.raises(_Killed):
        run_trial(tiny_config("ft_gen"), cache_dir=cache_dir, rungs=_kill_at(2, []), resume=resume)
    other = tiny_config("ft_gen", lr_generator=3e-4)
    assert load_point(resume, other.model_dump_json()) is None
    result = run_trial(other, cache_dir=cache_dir, resume=resume)
    assert "resumed" not in result.record
    assert result.metrics["train_steps"] == 4
    assert not Path(resume.folder).exists()
