"""EM, F1 and Recall@k against hand-worked SQuAD-style examples."""

from __future__ import annotations

import pytest

from trainers.evaluate import answer_text, exact_match, f1_score, normalize_answer, recall_at_k


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("The  Eiffel Tower!", "eiffel tower"),
        ("an apple a day", "apple day"),
        ("Chief of Protocol.", "chief of protocol"),
        ("U.S.A.", "usa"),
        ("Theatre", "theatre"),  # 'the' is removed only as a whole word
    ],
)
def test_normalize_answer_follows_squad(text, normalized):
    assert normalize_answer(text) == normalized


def test_exact_match_ignores_case_articles_and_punctuation():
    assert exact_match("the Eiffel tower", ["Eiffel Tower"]) == 1.0
    assert exact_match("Chief of Protocol.", ["chief of protocol"]) == 1.0
    assert exact_match("Eiffel", ["Eiffel Tower"]) == 0.0


def test_scores_take_the_best_alias():
    assert exact_match("NYC", ["New York City", "NYC"]) == 1.0
    assert f1_score("NYC", ["New York City", "NYC"]) == 1.0
    assert f1_score("New York", ["New York City", "NYC"]) == pytest.approx(0.8)  # P=1, R=2/3


def test_f1_by_hand():
    # prediction tokens: eiffel tower in paris; gold: eiffel tower -> P = 2/4, R = 2/2, F1 = 2/3
    assert f1_score("Eiffel Tower in Paris", ["the Eiffel Tower"]) == pytest.approx(2 / 3)
    assert f1_score("Barack Obama", ["Obama"]) == pytest.approx(2 / 3)
    assert f1_score("Paris", ["London"]) == 0.0
    # repeated tokens count once per occurrence in both: pred "a b b", gold "b b c" -> common 2
    assert f1_score("x y y", ["y y z"]) == pytest.approx(2 / 3)


def test_recall_at_k_counts_a_fraction_of_several_gold_documents():
    retrieved = [["a", "b", "c"], ["d", "e", "f"], ["g", "h", "i"]]
    gold = [["a", "x"], ["e"], []]  # two-hop half found, single-hop found, unlabelled left out
    assert recall_at_k(retrieved, gold) == pytest.approx((0.5 + 1.0) / 2)


def test_recall_at_k_is_none_without_labels():
    assert recall_at_k([["a"]], [[]]) is None


def test_answer_text_stops_at_the_next_section():
    assert answer_text("\n  Dravenholt \n### Question:\nmore") == "Dravenholt"
    assert answer_text("The answer is:\nthe Kessel Guild") == "The answer is: the Kessel Guild"
    assert answer_text("") == ""
