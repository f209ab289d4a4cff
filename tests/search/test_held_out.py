"""Which trials of a launch score the held-out test split (search.launch._test_scoring); the
launches that use it are in test_early_stopping, test_retrieval_study and test_studies."""

from __future__ import annotations

from search.launch._test_scoring import _StageLeads


def test_a_trial_scores_the_test_split_when_it_leads_its_stage_as_it_finishes():
    # The stage's best from earlier launches is where a relaunch starts.
    leads = _StageLeads({"ft_gen": 0.4}, "f1", maximize=True)
    assert not leads.claim("ft_gen", "trails", {"f1": 0.3, "em": 0.9})  # ranked on f1 alone
    assert leads.claim("ft_gen", "ties", {"f1": 0.4})
    assert leads.claim("ft_gen", "leads", {"f1": 0.5})
    assert not leads.claim("ft_gen", "second", {"f1": 0.45})
    assert leads.claim("two_phase", "first", {"f1": 0.1})  # each stage has its own lead
    # A leader that failed afterwards will never be the stage's best: the runner-up scores.
    leads.release("ft_gen", "leads")
    assert leads.claim("ft_gen", "runner-up", {"f1": 0.45})


def test_a_minimised_or_cost_objective_leads_the_other_way_or_scores_every_trial():
    lowest = _StageLeads({}, "f1", maximize=False)
    assert lowest.claim("s", "a", {"f1": 0.5})
    assert not lowest.claim("s", "b", {"f1": 0.6})
    assert lowest.claim("s", "c", {"f1": 0.2})
    # A cost objective is not among the validation scores a trial has when it asks.
    cheapest = _StageLeads({}, "device_s", maximize=False)
    assert cheapest.claim("s", "a", {"f1": 0.5}) and cheapest.claim("s", "b", {"f1": 0.1})
