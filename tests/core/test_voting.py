"""The one majority vote (core.voting.majority_index), hand-checked, and both of its users."""

import numpy as np

from metarl_llm.core.voting import majority_index
from metarl_llm.verify.best_of_n import _majority_score


def test_majority_index_counts_stripped_answers_and_keeps_the_first_of_a_tie():
    assert majority_index([" 4", "5", "4 ", None, ""]) == 0  # "4" twice: its first voter
    assert majority_index(["5", "4", "4", "5"]) == 0  # a tie: the answer given first
    assert majority_index(["", None, "  "]) is None  # nobody voted
    assert majority_index(["a", "b", "b"]) == 1


def test_majority_score_is_the_score_of_the_majority_answers_first_voter():
    assert _majority_score(np.array(["x", "y", "y"], dtype=object), np.array([1.0, 0.0, 0.5])) == 0.0
    assert _majority_score(np.array([None, ""], dtype=object), np.array([1.0, 1.0])) == 0.0
