"""The search plan: separable methods cost n + m, joint grids n x m, shared runs run once."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from search import forecast, throughput
from search.forecast import gib_text, method_memory, resume_point_size, trial_memory_ask
from search.plan import Plan, grid_points, make_plan
from search.plan_table import render_plan
from search.spec import PAPER_GRID, StudySpec, load_spec
from trainers import (
    ConfigError,
    LoadedPhase,
    MethodDeclaration,
    TrainedPhase,
    register_method,
)

REPO = Path(__file__).resolve().parents[2]
PAPER_HOTPOTQA = REPO / "studies" / "paper-hotpotqa.yaml"
DEMO = REPO / "studies" / "demo.yaml"


def _paper(**overrides: object) -> StudySpec:
    """The paper's HotPotQA spec with dotted overrides, e.g. ``{"search.joint": "cartesian"}``."""
    return load_spec(PAPER_HOTPOTQA, {key.replace("__", "."): v for key, v in overrides.items()})


def _text(plan: Plan, spec: StudySpec) -> str:
    console = Console(record=True, width=200)
    console.print(render_plan(plan, spec))
    return console.export_text()


@pytest.mark.parametrize("name", ["paper-hotpotqa.yaml", "paper-popqa.yaml"])
def test_paper_specs_search_separable_methods_in_n_plus_m_trials(name):
    spec = load_spec(REPO / "studies" / name)
    plan = make_plan(spec)
    for method in ("independent", "two_phase"):
        cost = plan.search_cost(method)
        assert cost["search"] == "separable"
        assert cost["searched_trials"] == 9 + 9 == 18
        assert cost["cartesian_trials"] == 81
    assert plan.search_cost("independent")["stages"] == {
        "ft_embed": 9,
        "ft_gen": 9,
        "independent": 1,
    }


def test_paper_spec_follows_the_paper_protocol():
    spec = load_spec(PAPER_HOTPOTQA)
    assert spec.search.sampler == "grid"
    assert tuple(spec.search.lr_embedder) == tuple(spec.search.lr_generator) == PAPER_GRID
    assert (spec.search.joint, spec.search.joint_reuse_from) == ("reuse", "two_phase")
    assert (spec.training.epochs, spec.training.k) == (1, 5)
    assert (spec.models.generator_finetune, spec.models.lora_rank) == ("qlora", 16)
    assert spec.resources.gpus == 1 and spec.concurrency == 8
    popqa = load_spec(REPO / "studies" / "paper-popqa.yaml")
    assert popqa.data.source == "popqa" and popqa.data.corpus_hub_name == "MedRAG/wikipedia"


def test_render_shows_separable_against_cartesian_counts_for_the_paper_spec():
    spec = load_spec(PAPER_HOTPOTQA)
    text = _text(make_plan(spec), spec)
    assert "18 = 9 + 9" in text and "81" in text
    assert "ft_gen is two_phase's phase 1" in text
    assert "forecast" in text and "FLOP/s per GPU" in text


def test_joint_cartesian_searches_the_product_of_both_grids():
    spec = _paper(search__joint="cartesian")
    plan = make_plan(spec)
    stage = plan.stage("rag_token")
    assert stage.searched == ("lr_embedder", "lr_generator") and stage.n_trials == 81
    points = grid_points(stage, spec)
    assert len(points) == 81
    assert {(p["lr_embedder"], p["lr_generator"]) for p in points} == set(
        itertools.product(PAPER_GRID, PAPER_GRID)
    )
    assert plan.search_cost("rag_token")["search"] == "cartesian"
    assert plan.search_cost("rag_token")["searched_trials"] == 81


def test_ft_gen_with_rag_token_is_two_phase_phase_one_and_runs_once():
    shared = make_plan(_paper(training__ft_gen_objective="rag_token"))
    separate = make_plan(_paper(training__ft_gen_objective="nll_concat"))

    assert "two_phase.generator" not in {stage.name for stage in shared.stages}
    assert shared.stage("two_phase").reuse_from == {"generator": "ft_gen"}
    assert shared.stage("two_phase").fixed_from == {"lr_generator": "ft_gen"}
    assert "two_phase" in shared.stage("ft_gen").serves

    phase_one = separate.stage("two_phase.generator")
    assert phase_one.method == "ft_gen" and phase_one.searched == ("lr_generator",)
    assert phase_one.training_overrides == {"ft_gen_objective": "rag_token"}
    assert separate.stage("two_phase").reuse_from == {"generator": "two_phase.generator"}
    assert "two_phase" not in separate.stage("ft_gen").serves
    assert separate.total_trials - shared.total_trials == 9  # m, the generator grid


def test_independent_alone_pulls_in_ft_embed_and_ft_gen():
    plan = make_plan(_paper(methods=["independent"]))
    assert [stage.name for stage in plan.stages] == ["ft_embed", "ft_gen", "independent"]
    assert plan.stage("ft_embed").serves == plan.stage("ft_gen").serves == ("independent",)
    independent = plan.stage("independent")
    assert independent.n_trials == 1 and independent.searched == ()
    assert independent.fixed_from == {"lr_embedder": "ft_embed", "lr_generator": "ft_gen"}
    assert independent.reuse_from == {"embedder": "ft_embed", "generator": "ft_gen"}
    assert plan.total_trials == 19


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"search__joint": "cartesian"},
        {"training__ft_gen_objective": "nll_concat"},
        {"methods": ["rag_sequence", "independent", "two_phase", "none"]},
        {"methods": ["rag_token"], "search__joint_reuse_from": "independent"},
    ],
)
def test_stages_come_after_the_stages_they_depend_on(overrides):
    plan = make_plan(_paper(**overrides))
    position = {stage.name: i for i, stage in enumerate(plan.stages)}
    assert len(position) == len(plan.stages)  # names are unique
    for stage in plan.stages:
        sources = {*stage.fixed_from.values(), *stage.reuse_from.values()}
        assert set(stage.depends_on) == sources
        assert all(position[dependency] < position[stage.name] for dependency in sources)


def test_tpe_searches_n_trials_per_stage():
    spec = _paper(search__sampler="tpe", search__n_trials=5, search__joint="cartesian")
    plan = make_plan(spec)
    assert plan.stage("ft_embed").n_trials == plan.stage("ft_gen").n_trials == 5
    assert plan.stage("two_phase").n_trials == 5
    assert plan.stage("rag_token").n_trials == 5
    assert plan.search_cost("independent")["searched_trials"] == 10
    with pytest.raises(ValueError, match="tpe"):
        grid_points(plan.stage("ft_embed"), spec)


def test_joint_reuse_from_two_phase_is_one_trial_with_both_rates_fixed():
    plan = make_plan(_paper(methods=["rag_token"]))
    stage = plan.stage("rag_token")
    assert stage.n_trials == 1 and stage.searched == ()
    assert stage.fixed_from == {"lr_embedder": "two_phase", "lr_generator": "ft_gen"}
    # two_phase was not asked for, but its stages are what rag_token's pair comes from.
    assert plan.stage("two_phase").serves == ("rag_token",)
    assert [stage.name for stage in plan.stages] == ["ft_gen", "two_phase", "rag_token"]
    assert plan.search_cost("rag_token")["trials"] == 9 + 9 + 1


def test_joint_reuse_from_independent_takes_ft_embed_and_ft_gen_rates():
    plan = make_plan(_paper(methods=["rag_sequence"], search__joint_reuse_from="independent"))
    assert plan.stage("rag_sequence").fixed_from == {
        "lr_embedder": "ft_embed",
        "lr_generator": "ft_gen",
    }


@pytest.mark.parametrize("source", ["rag_token", "rag_sequence", "none", "ft_embed"])
def test_joint_reuse_from_a_method_without_a_rate_pair_is_rejected(source):
    with pytest.raises(ConfigError, match="joint_reuse_from") as error:
        make_plan(_paper(search__joint_reuse_from=source))
    assert "\n" not in str(error.value) and "cartesian" in str(error.value)


def test_grid_points_list_one_dict_per_trial():
    spec = _paper(search__lr_embedder=[1e-5, 3e-5])
    plan = make_plan(spec)
    assert grid_points(plan.stage("ft_embed"), spec) == [
        {"lr_embedder": 1e-5},
        {"lr_embedder": 3e-5},
    ]
    assert plan.stage("ft_embed").n_trials == 2
    assert grid_points(plan.stage("independent"), spec) == [{}]
    assert plan.search_cost("two_phase")["searched_trials"] == 2 + 9


def test_forecast_is_positive_for_known_models_and_scales_with_concurrency():
    demo = load_spec(REPO / "studies" / "demo.yaml")
    plan = make_plan(demo)
    assert all(stage.forecast_s and stage.forecast_s > 0 for stage in plan.stages)
    # Stages overlap: the launch takes less than the stages one after another, and no less than
    # its longest chain (ft_gen, then two_phase, then rag_token), one trial time each.
    assert plan.forecast_s < sum(stage.forecast_s for stage in plan.stages)
    chain = ("ft_gen", "two_phase", "rag_token")
    assert plan.forecast_s >= sum(plan.stage(name).trial_forecast_s for name in chain)
    alone = make_plan(demo.model_copy(update={"concurrency": 1}))
    assert alone.forecast_s == pytest.approx(
        sum(stage.trial_forecast_s * stage.n_trials for stage in alone.stages)
    )
    # Generator training dominates: ft_gen costs more than ft_embed, and more data costs more.
    assert plan.stage("ft_gen").forecast_s > plan.stage("ft_embed").forecast_s
    bigger = make_plan(
        demo.model_copy(
            update={"data": demo.data.model_copy(update={"n_train": 10 * demo.data.n_train})}
        )
    )
    assert bigger.stage("ft_gen").forecast_s > 3 * plan.stage("ft_gen").forecast_s

    one = make_plan(_paper(concurrency=1)).stage("ft_embed").forecast_s
    eight = make_plan(_paper(concurrency=8)).stage("ft_embed").forecast_s
    assert one == pytest.approx(8 * eight)  # 9 trials: 9 waves against 9/8


def test_stages_start_critical_path_first():
    plan = make_plan(load_spec(REPO / "studies" / "demo.yaml"))
    order = plan.start_order
    # ft_gen feeds four stages, two_phase two, ft_embed one; the rest feed none.
    assert order[:3] == ("ft_gen", "two_phase", "ft_embed")
    assert set(order) == {stage.name for stage in plan.stages}


def test_unknown_model_forecasts_nothing_and_says_unknown():
    spec = _paper(models__generator="acme/not-a-real-model-7b")
    plan = make_plan(spec)
    assert all(stage.forecast_s is None for stage in plan.stages)
    assert plan.forecast_s is None
    text = _text(plan, spec)
    assert "unknown" in text and "acme/not-a-real-model-7b" in text


def test_unknown_training_size_forecasts_only_untrained_stages():
    spec = _paper(data__hub_name="someone/private-hotpotqa")
    plan = make_plan(spec)
    assert plan.stage("ft_gen").forecast_s is None
    assert plan.stage("none").forecast_s is not None  # evaluation only: n_validation is known
    assert "data.n_train" in _text(plan, spec)


def test_make_plan_loads_no_model(monkeypatch):
    import trainers.models

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("make_plan loaded a model")

    for loader in ("load_embedder", "load_generator"):
        monkeypatch.setattr(trainers.models, loader, refuse)
    spec = _paper(models__embedder="/nonexistent/embedder", models__generator="no/such-generator")
    plan = make_plan(spec)
    assert plan.total_trials == 31
    assert "unknown" in _text(plan, spec)


def test_search_cost_of_a_method_outside_the_study_is_a_config_error():
    plan = make_plan(_paper(methods=["ft_embed"]))
    with pytest.raises(ConfigError, match="not in this study"):
        plan.search_cost("two_phase")
    with pytest.raises(KeyError):
        plan.stage("two_phase")


def test_plan_shows_each_stages_forecast_memory_and_resources_memory_overrides_it():
    spec = load_spec(DEMO)
    plan = make_plan(spec)
    text = _text(plan, spec)
    assert "memory / trial" in text and "asked of Ray" in text
    for stage in plan.stages:
        row = next(line for line in text.splitlines() if line.startswith(f"│ {stage.name} "))
        assert gib_text(trial_memory_ask(stage, spec) or 0) in row
    none, ft_gen = plan.stage("none").trial_memory, plan.stage("ft_gen").trial_memory
    assert none and ft_gen and ft_gen.host_bytes > none.host_bytes  # a RAG step on top
    fixed = load_spec(DEMO, {"resources.memory": "3GiB"})
    assert {trial_memory_ask(stage, fixed) for stage in make_plan(fixed).stages} == {3 * 2**30}
    assert "resources.memory = 3.0 GiB" in _text(make_plan(fixed), fixed)


def test_plan_shows_the_disk_of_resume_points_and_when_they_are_off():
    spec = load_spec(DEMO, {"concurrency": 3})
    plan = make_plan(spec, forecast=False)
    sizes = {stage.name: resume_point_size(stage, spec) for stage in plan.stages}
    # A joint stage holds both models' weights and moments; ft_gen the LoRA adapter's alone.
    assert sizes["none"] == 0 and 0 < sizes["ft_gen"] < sizes["ft_embed"] < sizes["rag_token"]
    assert sizes["independent"] == 0  # it loads both phases from checkpoints, trains none
    text = " ".join(_text(plan, spec).split())
    largest = sizes["rag_token"] or 0
    assert f"up to {largest / 2**20:.1f} MiB per trial, {3 * largest / 2**20:.1f} MiB" in text
    off = load_spec(DEMO, {"resume_every_minutes": None})
    assert "resume points: off" in " ".join(_text(make_plan(off, forecast=False), off).split())


def test_fuller_prompts_forecast_more_memory_and_time_and_the_plan_says_which_fill():
    assumed, full = load_spec(DEMO), load_spec(DEMO, {"training.prompt_fill": 0.85})
    for name in ("none", "ft_gen", "rag_token"):
        short, long = make_plan(assumed).stage(name), make_plan(full).stage(name)
        assert short.trial_memory and long.trial_memory and short.trial_forecast_s
        assert long.trial_forecast_s and long.trial_forecast_s > short.trial_forecast_s, name
        if name != "rag_token":  # its step forwards fewer questions at once instead
            assert long.trial_memory.host_bytes > short.trial_memory.host_bytes, name
    assert "assumed to fill 55%" in " ".join(_text(make_plan(assumed), assumed).split())
    assert "prompts fill 85% of the token caps" in " ".join(_text(make_plan(full), full).split())


def test_fp32_forecasts_more_memory_and_time_than_bf16():
    fp32, bf16 = (load_spec(DEMO, {"training.precision": p}) for p in ("fp32", "bf16"))
    slow, fast = make_plan(fp32).stage("ft_gen"), make_plan(bf16).stage("ft_gen")
    assert slow.trial_forecast_s and fast.trial_forecast_s
    # The demo measured fp32 at 0.65x bf16's throughput on an AVX-512 CPU; the fixed per-trial
    # loading time is the same in both.
    assert slow.trial_forecast_s > 1.3 * fast.trial_forecast_s
    assert slow.trial_memory and fast.trial_memory
    assert slow.trial_memory.host_bytes > fast.trial_memory.host_bytes


def test_checkpointing_off_forecasts_more_memory_for_rag_training_only():
    on, off = (
        load_spec(DEMO, {"training.gradient_checkpointing": flag, "training.precision": "fp32"})
        for flag in (True, False)
    )
    memory = {
        (method, flag): method_memory(spec, method)
        for method in ("none", "ft_gen")
        for flag, spec in (("on", on), ("off", off))
    }
    assert memory["ft_gen", "off"].host_bytes > memory["ft_gen", "on"].host_bytes  # type: ignore[union-attr]
    assert memory["none", "off"] == memory["none", "on"]


def test_a_gpu_spec_forecasts_gpu_memory_with_4bit_weights():
    spec = load_spec(PAPER_HOTPOTQA)  # Llama-3-8B with QLoRA on one GPU per trial
    memory = make_plan(spec).stage("ft_gen").trial_memory
    assert memory is not None
    # 8B parameters at 4 bits are ~4.5 GB: the trial fits a 24 GB card (the paper's A10s).
    assert 4.5e9 < memory.device_bytes < 24e9
    assert "GPU" in _text(make_plan(spec), spec)


# Demo stages that train every phase themselves (the others load earlier stages' models): the
# evaluation-only peak, the RAG-Token generator step and the joint step (ft_embed's peak is the
# evaluation's, as none's).
_MEASURED_METHODS = ("none", "ft_gen", "rag_token")


@pytest.mark.slow
def test_forecast_peak_memory_is_within_30_percent_of_a_real_demo_trial(cache_dir):
    # The demo spec on 8 training questions (one step of the demo's batch) and 16 validation
    # questions (one evaluation batch). The peak grows little with more of them: none's was
    # 1,641 MiB on one batch and 1,801 on six (one thread), inside the 30%.
    overrides = {"data.n_train": 8, "data.n_validation": 16}
    # One thread each, as a demo trial of 1 CPU runs on Ray.
    env = os.environ | {
        "RAGSWEEP_CACHE": str(cache_dir),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    # Each trial in a fresh process (a worker's high-water mark is its own). none first: it
    # converts the generator and encodes the index into the cache, once, where three trials
    # started together would each do it; its peak is the evaluation's. Then the two training
    # trials side by side (their peaks do not depend on the cores they share), each evaluating
    # one question: their peak is the training step's, and the forecast does not depend on
    # data.n_validation.
    first, *together = _MEASURED_METHODS
    measured = _peak_bytes([_demo_trial(first, overrides, env)])
    one_question = overrides | {"data.n_validation": 1}
    measured |= _peak_bytes([_demo_trial(method, one_question, env) for method in together])
    assert set(measured) == set(_MEASURED_METHODS)
    for method, (peak, fill) in measured.items():
        # At the prompt fill the trial measured on the demo's data, as a launch forecasts.
        forecast = method_memory(
            load_spec(DEMO, overrides | {"training.prompt_fill": fill}), method
        )
        assert forecast is not None
        assert forecast.host_bytes == pytest.approx(peak, rel=0.3), method


def _demo_trial(
    method: str, overrides: dict[str, object], env: dict[str, str]
) -> tuple[str, subprocess.Popen[str]]:
    """``ragsweep train`` of one demo method, started in a new interpreter."""
    command = [sys.executable, "-c", "from search.cli import main; main()", "train"]
    command += [
        "--spec",
        str(DEMO),
        "--method",
        method,
        "--lr-embedder=2e-5",
        "--lr-generator=1e-3",
    ]
    command += [f"--set={key}={value}" for key, value in overrides.items()]
    process = subprocess.Popen(
        [*command, "--json"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )
    return method, process


def _peak_bytes(
    trials: list[tuple[str, subprocess.Popen[str]]],
) -> dict[str, tuple[float, float]]:
    """Each finished trial's measured peak resident memory and its prompt fill, by method."""
    peaks = {}
    for method, process in trials:
        output, _ = process.communicate(timeout=900)
        assert process.returncode == 0, f"the {method} trial failed"
        result = json.loads(output)
        peaks[method] = (result["metrics"]["peak_mem_mb"] * 2**20, result["record"]["prompt_fill"])
    return peaks


# A method the paper does not have, declared once: ft_gen trained on the concatenated prompt
# whatever training.ft_gen_objective says, and phase (b) of two_phase on top of it.
FT_GEN_CONCAT = MethodDeclaration(
    "ft_gen_concat", (TrainedPhase("generator", False, True, "nll_concat"),), rank=25
)
EMBED_ON_CONCAT = MethodDeclaration(
    "embed_on_concat",
    (
        LoadedPhase("generator", "ft_gen_concat"),
        TrainedPhase("embedder_rag", True, False, "rag_token"),
    ),
    rank=45,
)
# Loads ft_gen's phase trained with RAG-Token, as two_phase does.
REUSES_TWO_PHASE_ONE = MethodDeclaration(
    "joint_after_phase_one",
    (
        LoadedPhase("generator", "ft_gen", (("ft_gen_objective", "rag_token"),)),
        TrainedPhase("joint", True, True, "rag_sequence"),
    ),
)


@pytest.fixture
def toy_methods() -> None:
    for method in (FT_GEN_CONCAT, EMBED_ON_CONCAT, REUSES_TWO_PHASE_ONE):
        register_method(method)


def test_a_registered_method_is_planned_from_its_declaration(toy_methods):
    spec = _paper(methods=["embed_on_concat", "ft_gen_concat", "none"])
    plan = make_plan(spec)
    # Ranks order stages free to run; a stage comes after what it loads.
    assert [stage.name for stage in plan.stages] == ["none", "ft_gen_concat", "embed_on_concat"]
    concat = plan.stage("ft_gen_concat")
    assert concat.searched == ("lr_generator",) and concat.n_trials == 9
    assert concat.serves == ("embed_on_concat", "ft_gen_concat")
    stage = plan.stage("embed_on_concat")
    assert stage.searched == ("lr_embedder",) and stage.n_trials == 9
    assert stage.fixed_from == {"lr_generator": "ft_gen_concat"}
    assert stage.reuse_from == {"generator": "ft_gen_concat"}
    assert plan.search_cost("embed_on_concat")["search"] == "separable"
    assert all(s.forecast_s and s.trial_memory for s in plan.stages)
    text = _text(plan, spec)
    assert all(f"│ {name} " in text for name in ("ft_gen_concat", "embed_on_concat"))


def test_a_phase_loaded_with_other_settings_is_one_stage_for_every_method_loading_it(toy_methods):
    plan = make_plan(
        _paper(
            methods=["two_phase", "joint_after_phase_one"],
            search__joint="cartesian",
            training__ft_gen_objective="nll_concat",
        )
    )
    phase_one = plan.stage("two_phase.generator")
    assert phase_one.training_overrides == {"ft_gen_objective": "rag_token"}
    assert phase_one.serves == ("two_phase", "joint_after_phase_one")
    joint = plan.stage("joint_after_phase_one")
    assert joint.reuse_from == {"generator": "two_phase.generator"}
    # Its own phase trains both models: a joint method, searched on the grid.
    assert joint.searched == ("lr_embedder", "lr_generator") and joint.n_trials == 81
    assert joint.fixed_from == {}


def test_a_registered_joint_method_reuses_the_pair_like_the_paper_joint_methods(toy_methods):
    plan = make_plan(_paper(methods=["joint_after_phase_one"]))  # joint: reuse, from two_phase
    stage = plan.stage("joint_after_phase_one")
    assert stage.n_trials == 1 and stage.searched == ()
    assert stage.fixed_from == {"lr_embedder": "two_phase", "lr_generator": "ft_gen"}
    assert stage.reuse_from == {"generator": "ft_gen"}


def test_joint_reuse_from_takes_any_method_that_finds_both_rates(toy_methods):
    plan = make_plan(_paper(methods=["rag_token"], search__joint_reuse_from="embed_on_concat"))
    assert plan.stage("rag_token").fixed_from == {
        "lr_embedder": "embed_on_concat",
        "lr_generator": "ft_gen_concat",
    }
    with pytest.raises(ConfigError, match="joint_reuse_from is 'ft_gen_concat'") as error:
        make_plan(_paper(search__joint_reuse_from="ft_gen_concat"))
    offered = str(error.value).split("; use ")[1]
    assert "embed_on_concat" in offered and "two_phase" in offered
    assert "ft_gen_concat" not in offered and "rag_token" not in offered


def test_an_unregistered_method_in_a_spec_is_a_config_error():
    with pytest.raises(ConfigError, match="methods.0.*ft_embed"):
        _paper(methods=["not_declared"])


def test_planning_a_gpu_spec_loads_no_torch():
    code = (
        "import sys; from pathlib import Path; from search.spec import load_spec; "
        "from search.plan import make_plan; from search.plan_table import render_plan; "
        f"spec = load_spec(Path({str(PAPER_HOTPOTQA)!r})); render_plan(make_plan(spec), spec); "
        "print(sorted(m for m in ('torch', 'transformers', 'ray', 'optuna') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _stopping(**early_stopping: object) -> StudySpec:
    """The paper's spec with early stopping: ``early_stopping`` are its fields (defaults else)."""
    return _paper(search__early_stopping=early_stopping or True)


def test_early_stopping_forecast_follows_successive_halving_at_each_rung():
    # Generating as many tokens as an answer holds makes a signal's forward pass per question cost
    # what evaluation costs per question: the pieces of a trial all come from plain forecasts.
    same = {"training__max_new_tokens": 24, "training__max_answer_tokens": 24}
    plain = make_plan(_paper(**same))
    n = plain.stage("ft_gen").n_trials  # 9, one trained phase (RAG-Token generator)
    # The `none` stage only loads and evaluates; doubling n_validation doubles its evaluation.
    none_s = plain.stage("none").trial_forecast_s
    double = make_plan(_paper(data__n_validation=2000, **same)).stage("none").trial_forecast_s
    assert none_s and double and plain.stage("ft_gen").trial_forecast_s
    loading = 2 * none_s - double
    evaluation = none_s - loading
    training = plain.stage("ft_gen").trial_forecast_s - none_s
    signal = evaluation * 16 / 1000  # 16 of the 1000 validation questions

    def stage_s(factor: int) -> float:
        stopping = {"questions": 16, "reduction_factor": factor}
        spec = _paper(search__early_stopping=stopping, **same)
        per_trial = make_plan(spec).stage("ft_gen").early_stopping_trial_s
        assert per_trial is not None
        return n * per_trial

    # Factor 2, rungs at 1/4 and 1/2: 4.5 trials stop at rung 1 (a quarter of training, one
    # signal), 2.25 at rung 2 (half, two signals), 2.25 run to the end and take both signals:
    # 13.5 signals, 4.5 trainings, 2.25 evaluations.
    halving = 9 * loading + 4.5 * training + 2.25 * evaluation + 13.5 * signal
    assert stage_s(2) == pytest.approx(halving, rel=1e-9)
    # Factor 3: 6 stop at rung 1, 2 at rung 2 (9/9 = 1 goes on): 12 signals, 3.5 trainings, 1 eval.
    thirds = 9 * loading + 3.5 * training + 1 * evaluation + 12 * signal
    assert stage_s(3) == pytest.approx(thirds, rel=1e-9)
    assert stage_s(2) < 0.6 * n * plain.stage("ft_gen").trial_forecast_s


def test_early_stopping_leaves_stages_of_one_trial_or_no_training_alone():
    spec = _stopping()
    plan, plain = make_plan(spec), make_plan(_paper())
    for name in ("none", "independent", "rag_token"):  # evaluation only, loads only, one trial
        stage = plan.stage(name)
        assert stage.early_stopping_forecast_s == pytest.approx(plain.stage(name).forecast_s)
    for name in ("ft_embed", "ft_gen", "two_phase"):
        stage = plan.stage(name)
        assert stage.early_stopping_forecast_s and stage.forecast_s
        assert stage.early_stopping_forecast_s < stage.forecast_s
        # The same waves as without: the stage's trials over min(concurrency, trials) slots.
        waves = stage.n_trials / min(spec.concurrency, stage.n_trials)
        assert stage.early_stopping_forecast_s == pytest.approx(
            waves * stage.early_stopping_trial_s
        )
    assert plan.forecast_s == pytest.approx(plain.forecast_s)  # the full grid is unchanged
    assert plan.early_stopping_forecast_s and plan.forecast_s
    assert plan.early_stopping_forecast_s < plan.forecast_s
    assert plain.early_stopping_forecast_s is None
    assert all(stage.early_stopping_forecast_s is None for stage in plain.stages)


def test_plan_shows_the_forecast_with_early_stopping_beside_the_full_grid_only_when_on():
    spec = _stopping(questions=32, reduction_factor=3)
    plan = make_plan(spec)
    text = _text(plan, spec)
    assert "with early stopping" in text
    ft_gen = next(line for line in text.splitlines() if line.lstrip("│ ").startswith("ft_gen "))
    forecasts = [plan.stage("ft_gen").forecast_s, plan.stage("ft_gen").early_stopping_forecast_s]
    assert all(_duration_text(seconds) in ft_gen for seconds in forecasts)
    assert f"with early stopping {_duration_text(plan.early_stopping_forecast_s)}" in text
    flat = " ".join(text.split())
    assert "max(1, n / 3^j) go on past rung j" in flat and "32 validation prompts" in flat
    assert "one first at a rung goes on" in flat and "2 standard errors" in flat
    assert "early stopping" not in _text(make_plan(_paper()), _paper())


def _duration_text(seconds: float | None) -> str:
    from search.plan_table import _duration

    return _duration(seconds)


def test_an_fp32_forecast_runs_at_the_rate_measured_for_this_cpus_vector_instructions(
    monkeypatch,
):
    spec = load_spec(DEMO, {"training.precision": "fp32"})
    monkeypatch.setattr(throughput, "_has_avx512", lambda: True)
    wide = make_plan(spec).stage("ft_gen").trial_forecast_s
    monkeypatch.setattr(throughput, "_has_avx512", lambda: False)
    narrow = make_plan(spec).stage("ft_gen").trial_forecast_s
    assert wide and narrow
    # Only the compute scales; loading a trial's models takes what it takes.
    overhead = forecast._TRIAL_OVERHEAD_S
    assert (narrow - overhead) / (wide - overhead) == pytest.approx(
        throughput._AVX512_FP32_CPU_FLOPS_PER_CPU / throughput.cpu_flops_per_cpu(False)
    )
    assert throughput.cpu_flops_per_cpu(False) < throughput._AVX512_FP32_CPU_FLOPS_PER_CPU / 2
    assert "an AVX2 CPU (this CPU has no AVX-512)" in forecast.forecast_note(spec)


def test_a_model_or_size_the_tables_lack_is_unknown_and_said_why():
    spec = _paper(models__generator="Qwen/Qwen2.5-7B-Instruct", data__n_train=None)
    plan = make_plan(spec)
    assert all(stage.trial_forecast_s is None for stage in plan.stages)
    assert method_memory(spec, "rag_token") is None
    text = " ".join(_text(plan, spec).split())  # lines wrap
    assert (
        "forecast unknown: generator 'Qwen/Qwen2.5-7B-Instruct' is not in search/sizes.py" in text
    )
    assert "known: smollm2-135m," in text
    # The embedder is listed, and so is the paper's HotPotQA split: n_train unset is known.
    assert text.count("forecast unknown:") == 1
    local = _paper(data__path="hotpotqa.jsonl", data__n_train=None)
    local_text = " ".join(_text(make_plan(local), local).split())
    assert local_text.count("forecast unknown:") == 1
    assert "forecast unknown: the training set size is unknown" in local_text
