"""Methods are declarations: the paper's seven, phases resolved from them, and new ones
registered at runtime that trials, configs and plans accept."""

from __future__ import annotations

import math
import pickle

import pytest
from pydantic import ValidationError

from tests.tiny import TINY_TRAINING, tiny_config
from trainers import (
    METHODS,
    ConfigError,
    LoadedPhase,
    MethodDeclaration,
    Phase,
    TrainedPhase,
    TrialConfig,
    method_declaration,
    method_declarations,
    method_names,
    method_phases,
    needs_context_labels,
    register_method,
    trains,
)
from trainers.methods import label_free_embedder_methods

RAG_TOKEN_TRAINING = TINY_TRAINING.model_copy(update={"ft_gen_objective": "rag_token"})
# ft_gen on the concatenated prompt, whatever training.ft_gen_objective says.
FT_GEN_CONCAT = MethodDeclaration(
    "ft_gen_concat", (TrainedPhase("generator", False, True, "nll_concat"),), rank=25
)


def test_the_paper_methods_come_first_and_are_the_default():
    assert METHODS == (
        "none",
        "ft_embed",
        "ft_gen",
        "independent",
        "two_phase",
        "rag_token",
        "rag_sequence",
    )
    assert method_names()[: len(METHODS)] == METHODS
    ranks = [method_declaration(name).rank for name in METHODS]
    assert ranks == sorted(ranks)


def test_phases_resolve_from_the_declarations():
    generator = Phase("generator", False, True, "nll_concat")
    embedder = Phase("embedder", True, False, "mnrl")
    assert method_phases("none", TINY_TRAINING) == ()
    assert method_phases("ft_gen", TINY_TRAINING) == (generator,)
    assert method_phases("ft_gen", RAG_TOKEN_TRAINING) == (
        Phase("generator", False, True, "rag_token"),
    )
    # Loaded phases are their source's phase, under the settings they name.
    assert method_phases("independent", TINY_TRAINING) == (generator, embedder)
    for training in (TINY_TRAINING, RAG_TOKEN_TRAINING):
        assert method_phases("two_phase", training) == (
            Phase("generator", False, True, "rag_token"),
            Phase("embedder_rag", True, False, "rag_token"),
        )
    assert method_phases("rag_sequence", TINY_TRAINING) == (
        Phase("joint", True, True, "rag_sequence"),
    )


def test_rates_searched_come_from_the_phases_a_method_trains_itself():
    rates = {name: method_declaration(name).rates for name in METHODS}
    assert rates == {
        "none": (),
        "ft_embed": ("lr_embedder",),
        "ft_gen": ("lr_generator",),
        "independent": (),  # both phases loaded
        "two_phase": ("lr_embedder",),  # phase 1 loaded
        "rag_token": ("lr_embedder", "lr_generator"),
        "rag_sequence": ("lr_embedder", "lr_generator"),
    }
    assert [name for name in METHODS if method_declaration(name).joint] == [
        "rag_token",
        "rag_sequence",
    ]
    assert trains("independent", TINY_TRAINING) == (True, True)


def test_context_labels_are_needed_wherever_mnrl_trains():
    needing = [name for name in METHODS if needs_context_labels(name, TINY_TRAINING)]
    assert needing == ["ft_embed", "independent"]
    assert label_free_embedder_methods()[:3] == ("two_phase", "rag_token", "rag_sequence")


def test_declarations_survive_pickling():
    for declaration in method_declarations():
        assert pickle.loads(pickle.dumps(declaration)) == declaration


def test_a_registered_method_is_a_valid_trial_method():
    with pytest.raises(ValidationError, match="unknown method 'never_registered'"):
        TrialConfig(method="never_registered")
    assert register_method(FT_GEN_CONCAT) is FT_GEN_CONCAT
    assert register_method(FT_GEN_CONCAT) is FT_GEN_CONCAT  # again, equal: nothing changes
    assert TrialConfig(method="ft_gen_concat").method == "ft_gen_concat"
    assert "ft_gen_concat" in method_names() and "ft_gen_concat" not in METHODS
    assert method_phases("ft_gen_concat", RAG_TOKEN_TRAINING) == (
        Phase("generator", False, True, "nll_concat"),
    )
    other = MethodDeclaration(
        "ft_gen_concat", (TrainedPhase("generator", False, True, "rag_token"),)
    )
    with pytest.raises(ConfigError, match="already registered"):
        register_method(other)


@pytest.mark.parametrize(
    ("declaration", "message"),
    [
        (MethodDeclaration("a.b", ()), "only letters, digits"),
        (MethodDeclaration("x", (TrainedPhase("p", False, False, "mnrl"),)), "trains neither"),
        (MethodDeclaration("x", (TrainedPhase("p", True, False, "bm25"),)), "objective 'bm25'"),  # type: ignore[arg-type]
        (
            MethodDeclaration(
                "x",
                (TrainedPhase("p", True, False, "mnrl"), TrainedPhase("p", True, False, "mnrl")),
            ),
            "repeat",
        ),
        (MethodDeclaration("x", (LoadedPhase("generator", "no_such"),)), "unknown method"),
        (MethodDeclaration("x", (LoadedPhase("joint", "ft_gen"),)), "does not have"),
        (
            MethodDeclaration("x", (LoadedPhase("generator", "ft_gen", (("no_field", 1),)),)),
            "not training fields",
        ),
    ],
)
def test_a_bad_declaration_is_refused_with_the_reason(declaration, message):
    with pytest.raises(ConfigError, match=message):
        register_method(declaration)
    assert declaration.name not in method_names()


def test_a_registered_method_trains_with_its_declared_objective(cache_dir):
    register_method(FT_GEN_CONCAT)
    # ft_gen_concat ignores training.ft_gen_objective: it trains as ft_gen does with nll_concat.
    concat = run_trial_of("ft_gen_concat", RAG_TOKEN_TRAINING, cache_dir)
    ft_gen = run_trial_of("ft_gen", TINY_TRAINING, cache_dir)
    assert concat.record["phases"] == ["generator"]
    assert concat.metrics["generator.steps"] == math.ceil(16 / 4)
    assert concat.record["final_losses"] == ft_gen.record["final_losses"]
    assert concat.predictions == ft_gen.predictions


def run_trial_of(method: str, training, cache_dir):
    from trainers import run_trial

    return run_trial(tiny_config(method, training=training), cache_dir=cache_dir)
