"""One majority vote, for maj@k (metarl_llm.evaluation.curves) and maj@N beside best-of-N
(metarl_llm.verify.best_of_n)."""

from __future__ import annotations

from typing import Sequence


def majority_index(answers: Sequence[str | None]) -> int | None:
    """Index of the first voter that gave the most frequent answer.

    Answers are compared after stripping whitespace; None or empty answers do not vote; among
    answers with equal counts the one given first wins. None when nobody voted.
    """
    votes: dict[str, list[int]] = {}  # answer -> [count, index of the first voter that gave it]
    for i, a in enumerate(answers):
        a = (a or "").strip()
        if a:
            votes.setdefault(a, [0, i])[0] += 1
    if not votes:
        return None
    _, (_, first) = max(votes.items(), key=lambda kv: kv[1][0])  # max keeps the first of equal counts
    return first
