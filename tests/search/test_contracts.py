"""The private parts of Ray and Optuna that ragsweep relies on, pinned: where an upgrade moves one,
this fails first and names it, instead of a launch misbehaving.

Each entry says where the code uses it; pyproject.toml bounds both libraries from above as well.
"""

from __future__ import annotations

import inspect

import optuna
import pytest


def test_tunes_actor_manager_still_takes_a_dead_actors_error_by_keyword():
    # search.launch._memory_kills wraps these two callbacks to hand Tune a memory kill as an
    # actor death; Ray calls them with exception=... .
    from ray.air.execution._internal.actor_manager import RayActorManager

    for name in ("_actor_start_failed", "_actor_task_failed"):
        callback = getattr(RayActorManager, name)
        assert "exception" in inspect.signature(callback).parameters, name


def test_tune_trial_keeps_its_last_error_in_a_pickled_file():
    # search.launch._memory_kills reads the error Tune recorded for a failed trial.
    from ray.tune.experiment import Trial

    assert isinstance(inspect.getattr_static(Trial, "pickled_error_file"), property)


def test_tune_reports_an_out_of_memory_kill_as_its_own_error_type():
    # The error the memory monitor's kill reaches Tune as, which _memory_kills translates.
    from ray.exceptions import OutOfMemoryError, RayActorError

    assert not issubclass(OutOfMemoryError, RayActorError)


@pytest.mark.parametrize("attribute", ["_trial_id"])
def test_optuna_frozen_trials_keep_their_storage_id(attribute):
    # search.store fails a RUNNING trial left by a dead launch through optuna.Trial(study, id),
    # which needs the storage id a FrozenTrial keeps privately.
    study = optuna.create_study()
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=1)
    frozen = study.trials[0]
    assert isinstance(getattr(frozen, attribute), int)


def test_optuna_keeps_an_enqueued_trials_parameters_as_fixed_params():
    # search.launch._optuna_search reads which grid points a killed launch left queued from the
    # system attribute enqueue_trial writes.
    study = optuna.create_study()
    study.enqueue_trial({"x": 0.5})
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert waiting[0].system_attrs["fixed_params"] == {"x": 0.5}
