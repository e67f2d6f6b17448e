"""bench/verifier_picks.py on a hand-built heldout_scores.jsonl."""

import json

import pytest

from tests.support import load_script


def trial(group, score, answer, outcome):
    return {"group": group, "score": score, "answer": answer, "outcome": outcome}


def test_picks_shares_and_votes_by_hand(tmp_path):
    vp = load_script("bench/verifier_picks.py")
    rows = [
        # problem 0: the right answer "7" is the mode; the verifier's highest score goes to a lone "9"
        trial(0, 0.5, "7", 1.0),
        trial(0, 0.95, "9", 0.0),
        trial(0, 0.4, "7", 1.0),
        trial(0, 0.1, " 8", 0.0),
        # problem 1: every trial right, the scores in order
        trial(1, 0.2, "3", 1.0),
        trial(1, 0.3, "3", 1.0),
        trial(1, 0.6, "3", 1.0),
        trial(1, 0.7, None, 0.0),
    ]
    (tmp_path / "heldout_scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = vp.analyse(vp.load(tmp_path))
    assert (r["problems"], r["trials"], r["n"]) == (2, 8, [1, 2, 4])
    assert r["highest_success"] == 0.0 and r["lowest_success"] == 0.5  # "9" and None; " 8" and "3"
    assert r["highest_answer_share"] == pytest.approx((1 / 4 + 1 / 4) / 2)  # "9" alone; None alone
    assert r["lowest_answer_share"] == pytest.approx((1 / 4 + 3 / 4) / 2)
    assert r["answer_share"] == pytest.approx(((2 + 1 + 2 + 1) / 16 + (3 + 3 + 3 + 1) / 16) / 2)
    assert (r["within_problem_auroc"], r["mixed_problems"]) == (pytest.approx((2 / 4 + 0.0) / 2), 2)
    # problem 0 at N=2: "7" (0.5) against "9" (0.95) -> "9"; at N=4: "7" (0.9) against "9" -> "9" still.
    # problem 1 votes "3" (None does not vote). maj@2 of problem 0 is a tie, won by the first seen ("7")
    assert r["weighted_vote"] == pytest.approx([1.0, 0.5, 0.5])
    assert r["maj"] == pytest.approx([1.0, 1.0, 1.0])
    assert vp.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert vp.spearman([1, 1, 2, 2], [5, 5, 7, 7]) == pytest.approx(1.0)  # midranks of ties
    with pytest.raises(SystemExit, match="heldout_scores.jsonl not found"):
        vp.load(tmp_path / "missing")
