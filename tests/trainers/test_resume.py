"""Resume points: a trial killed part-way and run again continues where it was and ends exactly
as the same trial never stopped, on tiny real models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tiny import TINY_DATA, TINY_TRAINING, tiny_config
from trainers import resume as resume_module
from trainers.config import TrialConfig
from trainers.data import load_data
from trainers.memory import ModelShape, resume_point_bytes
from trainers.methods import Phase, method_phases
from trainers.models import load_embedder, load_generator, parameter_counts
from trainers.pipeline import Pipeline
from trainers.resume import (
    Resume,
    ResumePoint,
    capture_random_state,
    discard_point,
    load_point,
    restore_random_state,
    save_point,
    usable_point,
)
from trainers.rungs import Rung, Rungs
from trainers.trial import TrialResult, run_trial

pytestmark = pytest.mark.xdist_group("test_resume")
CPU = torch.device("cpu")


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
        for rung in resumed.record.get("rungs", [])
    ] == [
        {key: value for key, value in rung.items() if key != "wall_s"}
        for rung in whole.record.get("rungs", [])
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
    assert resumed.record["resumed"] == {
        "finished_phases": finished,
        "phase": phase,
        "step": step,
        "questions_answered": None,
    }
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
    point = load_point(resume, config.model_dump_json(), _fingerprint(config))
    assert point is not None and point.phase == "generator" and point.progress is not None
    assert point.progress.step == 1
    assert point.costs["generator"].steps == 1 and point.costs["generator"].flops > 0
    # The LoRA weights only: the frozen embedder is not copied.
    assert list(point.progress.weights) == ["generator"] and point.progress.weights["generator"]
    assert all(w.dtype == torch.float32 for w in point.progress.weights["generator"].values())


def test_a_point_from_another_config_is_not_taken(cache_dir, tmp_path):
    resume = Resume(tmp_path / "resume", every_s=float("inf"))
    with pytest.raises(_Killed):
        run_trial(tiny_config("ft_gen"), cache_dir=cache_dir, rungs=_kill_at(2, []), resume=resume)
    other = tiny_config("ft_gen", lr_generator=3e-4)
    assert load_point(resume, other.model_dump_json(), _fingerprint(other)) is None
    result = run_trial(other, cache_dir=cache_dir, resume=resume)
    assert "resumed" not in result.record
    assert result.metrics["train_steps"] == 4
    assert not Path(resume.folder).exists()


class _GenerationCounter:
    """Counts the pipeline's generation calls (one per evaluation batch); raises _Killed at
    call ``kill_at`` to stand for the process dying there."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, kill_at: int | None = None) -> None:
        self.calls, self._kill_at = 0, kill_at
        generate = Pipeline.generate

        def counted(pipeline: Pipeline, prompts: list[str]):
            self.calls += 1
            if self.calls == self._kill_at:
                raise _Killed
            return generate(pipeline, prompts)

        monkeypatch.setattr(Pipeline, "generate", counted)


def test_a_trial_killed_while_it_evaluates_answers_only_the_rest(cache_dir, tmp_path, monkeypatch):
    """Killed in its third batch of validation questions (of four, two questions each), the
    trial run again answers the last two batches only and ends as the trial never stopped."""
    training = TINY_TRAINING.model_copy(update={"eval_batch_size": 2})
    config = tiny_config("ft_gen", training=training)
    whole = run_trial(config, cache_dir=cache_dir)
    resume = Resume(tmp_path / "resume", every_s=0.0)
    with monkeypatch.context() as patched:
        _GenerationCounter(patched, kill_at=3)
        with pytest.raises(_Killed):
            run_trial(config, cache_dir=cache_dir, resume=resume)
    with monkeypatch.context() as patched:
        generations = _GenerationCounter(patched)
        resumed = run_trial(config, cache_dir=cache_dir, resume=resume)
    assert generations.calls == 2
    assert resumed.record["resumed"] == {
        "finished_phases": ["generator"],
        "phase": "eval",
        "step": None,
        "questions_answered": 4,
    }
    _same_trial(resumed, whole)
    # The evaluation's work counted once: the batches before the kill came with the point.
    for figure in ("eval.steps", "eval.tokens", "eval.flops"):
        assert resumed.metrics[figure] == whole.metrics[figure], figure


def test_a_trial_killed_before_its_test_split_keeps_its_validation(
    cache_dir, tmp_path, monkeypatch
):
    data = TINY_DATA.model_copy(update={"n_test": 4})
    config = tiny_config("ft_gen", data=data)
    whole = run_trial(config, cache_dir=cache_dir)
    resume = Resume(tmp_path / "resume", every_s=float("inf"))

    def killed(quality: dict[str, float]) -> bool:
        raise _Killed

    with pytest.raises(_Killed):
        run_trial(config, cache_dir=cache_dir, resume=resume, score_test=killed)
    with monkeypatch.context() as patched:
        generations = _GenerationCounter(patched)
        resumed = run_trial(config, cache_dir=cache_dir, resume=resume)
    assert generations.calls == 1  # the test split's one batch; validation came with the point
    assert resumed.record["resumed"]["phase"] == "eval"
    assert resumed.record["resumed"]["questions_answered"] == len(resumed.questions)
    _same_trial(resumed, whole)
    assert resumed.metrics["test_f1"] == whole.metrics["test_f1"]


@pytest.mark.parametrize("method", ["ft_embed", "ft_gen", "rag_token"])
def test_a_point_is_the_size_the_plan_forecasts(method, cache_dir, tmp_path):
    # The plan's disk forecast (search.forecast.resume_point_size) rests on this formula; the
    # file adds keys, random states and the config: a few KiB on the tiny models' ~0.5 MB.
    config = tiny_config(method)
    resume = Resume(tmp_path / "resume", every_s=float("inf"))
    with pytest.raises(_Killed):
        run_trial(config, cache_dir=cache_dir, rungs=_kill_at(2, []), resume=resume)
    point_file = tmp_path / "resume" / "resume.pt"
    point = load_point(resume, config.model_dump_json(), _fingerprint(config))
    assert point is not None and point.progress is not None  # killed while training

    models = config.models
    embedder = load_embedder(models.embedder, cache_dir=cache_dir, device=CPU)
    generator = load_generator(
        models.generator, cache_dir=cache_dir, device=CPU, lora_rank=models.lora_rank
    )
    forecast = resume_point_bytes(
        method_phases(method, config.training),
        embedder=ModelShape(params=parameter_counts(embedder)[0]),
        generator_trainable=parameter_counts(generator.model)[1],
    )
    assert forecast > 0
    assert forecast <= point_file.stat().st_size <= forecast * 1.05 + 64 * 1024


def test_a_partial_point_left_by_a_killed_writer_is_removed(cache_dir, tmp_path):
    # A process killed while it wrote a point leaves its partial file, as large as a point and
    # never read: the trial's next run removes it with its first point, the end with the folder.
    resume = Resume(tmp_path / "resume", every_s=0.0)
    resume.folder.mkdir()
    stale = resume.folder / ".resume.pt.99999"
    stale.write_bytes(b"half a point")
    stale_at_rungs: list[bool] = []
    run_trial(
        tiny_config("ft_gen"),
        cache_dir=cache_dir,
        rungs=Rungs((0.25, 0.5), 4, lambda rung: stale_at_rungs.append(stale.exists())),
        resume=resume,
    )
    assert stale_at_rungs and stale_at_rungs[-1] is False
    assert not resume.folder.exists()

    resume.folder.mkdir()
    (resume.folder / "resume.pt").write_bytes(b"a point")
    stale.write_bytes(b"half a point")
    discard_point(resume)
    assert not resume.folder.exists()


@pytest.mark.parametrize("gpus_now", [0, 1, 2])
def test_random_state_from_two_gpus_restores_on_the_gpus_there_are(monkeypatch, gpus_now):
    # No GPU here: torch.cuda stands in for a node with ``gpus_now`` of them, to see which
    # devices get a saved state. Saved on two; a state for a GPU the node lacks would fail.
    saved = capture_random_state() | {"cuda": [torch.zeros(16, dtype=torch.uint8)] * 2}
    restored: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus_now > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus_now)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append(device))
    restore_random_state(saved)
    assert restored == list(range(gpus_now))


def test_the_last_split_answered_whole_writes_no_point(cache_dir, tmp_path, monkeypatch):
    # The trial ends there and deletes its point: writing one would copy the trained weights for
    # nothing. Validation with a test split after it is saved whole (the test may be killed).
    saved: list[str | None] = []
    real_save = resume_module.save_point

    def counted_save(resume: Resume, point: ResumePoint) -> None:
        saved.append(point.phase)
        real_save(resume, point)

    monkeypatch.setattr(resume_module, "save_point", counted_save)
    never_due = float("inf")
    run_trial(
        tiny_config("none"), cache_dir=cache_dir, resume=Resume(tmp_path / "a", every_s=never_due)
    )
    assert saved == []
    with_test = tiny_config("none", data=TINY_DATA.model_copy(update={"n_test": 4}))
    run_trial(with_test, cache_dir=cache_dir, resume=Resume(tmp_path / "b", every_s=never_due))
    assert saved == ["eval"]


def test_a_point_after_a_phase_whose_model_a_later_one_trains_again_is_not_taken(tmp_path):
    # A declared method may train one model in two phases. Once the first has finished, its
    # model as it finished is gone: a run that saves each phase's model cannot resume (it would
    # save the later phase's weights as the first's); one that saves none can.
    config = tiny_config("ft_gen")
    phases = [
        Phase("generator", False, True, "nll_concat"),
        Phase("polish", False, True, "nll_concat"),
    ]
    resume = Resume(tmp_path / "resume")
    for finished in ({"generator": 1.0}, {"generator": 1.0, "polish": 0.5}):
        save_point(resume, _point(config, "data", finished))
        assert usable_point(resume, config, "data", phases, tmp_path / "out") is None, finished
        assert usable_point(resume, config, "data", phases, None) is not None, finished


def test_a_point_from_other_data_is_not_taken(tmp_path):
    # The same config reads other data when its data.path file changed between the two runs.
    config = tiny_config("ft_gen")
    phases = method_phases("ft_gen", config.training)
    resume = Resume(tmp_path / "resume")
    save_point(resume, _point(config, "old data", {}))
    assert usable_point(resume, config, "new data", phases, None) is None
    assert usable_point(resume, config, "old data", phases, None) is not None


def _point(config: TrialConfig, data_fingerprint: str, finished: dict) -> ResumePoint:
    return ResumePoint(config.model_dump_json(), data_fingerprint, finished=finished, costs={})


def _fingerprint(config: TrialConfig) -> str:
    return load_data(config.data).fingerprint
