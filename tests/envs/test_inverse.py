"""The verification-asymmetric inverse problem (envs/inverse.py): problems, grading, expert traces."""

from __future__ import annotations

import gymnasium
import numpy as np
import pytest

import envs
from envs.inverse import InverseEnv, _problems


def make(**kwargs) -> InverseEnv:
    return gymnasium.make(envs.ENV_IDS["inverse"], **kwargs).unwrapped


def test_problems_cover_every_unit_and_residue_and_split_disjointly():
    train, test = _problems(10, 0.2, "train"), _problems(10, 0.2, "test")
    assert len(train) + len(test) == 4 * 10 * 10 and not set(train) & set(test)
    assert 40 < len(test) < 120 and make(split="test").num_problems == len(test)
    env = make(split="test")
    for i in range(len(test)):
        env.reset(options={"index": i})
        a, b, y = (env.problem.data[k] for k in "aby")
        assert (a * int(env.reference_answer) + b) % 10 == y and env.problem.prompt == f"{a}x+{b}={y} (mod 10)\n"


def test_grading_parses_a_leading_integer_and_never_more():
    env = make()
    env.reset(options={"index": 0})
    gold = int(env.reference_answer)
    assert env.score(f" {gold}") == 1.0 and env.score(f"{gold + 10}") == 1.0  # congruent mod m solves too
    assert env.score(f"{(gold + 1) % 10}") == 0.0 and env.score(f"x={gold}") == 0.0 and env.score(str(gold) * 12) == 0.0
    assert env.score_episode(f"try {gold}: whatever -> 0 no") == 1.0  # the candidate, not the check, is scored
    assert env.score_episode(f"try {gold}: ... no\ntry {(gold + 1) % 10}") == 0.0  # the last candidate


@pytest.mark.parametrize("variety", [0.0, 0.5, 1.0])
def test_informed_expert_traces_search_with_right_checks(variety):
    env = make(max_episodes=6, expert_search="informed")
    rng = np.random.default_rng(0)
    for index in range(30):
        env.reset(options={"index": index})
        a, b, y = (env.problem.data[k] for k in "aby")
        gold = int(env.reference_answer)
        for n_failed in range(6):
            trace = env.expert_trace(rng, n_failed, variety)
            xs = [int(e.split()[1].rstrip(":")) for e in trace]
            assert len(set(xs)) == len(xs) and xs[-1] == gold and gold not in xs[:-1]  # no candidate twice
            for x, e in zip(xs, trace):
                v = a * x + b
                assert e.startswith(f"try {x}: {a}*{x}+{b}={v} -> {v % 10} ")  # the check is right
            assert all(e.endswith(" no") for e in trace[:-1]) and trace[-1].endswith(f" Answer: {gold}")
            assert max(len(e) for e in trace) <= 32  # the default budget's episode, one character a token
            if variety == 0.0:
                assert xs == [(gold - n_failed + j) % 10 for j in range(n_failed + 1)]  # focused: counting up


@pytest.mark.parametrize("variety", [0.0, 0.5, 1.0])
def test_blind_expert_traces_are_trials_of_a_search_that_reads_the_gold_only_by_its_checks(variety):
    env = make(max_episodes=3)
    assert env.expert_may_fail and not make(expert_search="informed").expert_may_fail
    rng = np.random.default_rng(0)
    outcomes = []
    for index in range(env.num_problems):
        env.reset(options={"index": index})
        a, b, y = (env.problem.data[k] for k in "aby")
        gold = int(env.reference_answer)
        trace = env.expert_trace(rng, 0, variety)
        checked = trace if trace[-1].startswith("try ") else trace[:-1]
        xs = [int(e.split()[1].rstrip(":")) for e in checked]
        for x, e in zip(xs, checked):
            v = a * x + b
            assert e.startswith(f"try {x}: {a}*{x}+{b}={v} -> {v % 10} ")  # the check is right
            assert e.endswith(f" Answer: {x}" if x == gold else " no")  # commits iff the check gives y
        if trace[-1].startswith("try "):  # committed within the budget
            assert xs[-1] == gold and len(trace) <= 3
        else:  # the budget spent: the forced answer, a candidate not yet tried
            assert len(trace) == 4 and gold not in xs and int(trace[-1]) not in xs and trace[-1] == f" {int(trace[-1])}"
        if variety == 0.0:  # focused: counting up from y, whatever the gold
            xs_all = [int(e.split()[1].rstrip(":")) if e.startswith("try") else int(e) for e in trace]
            assert xs_all == [(y + i) % 10 for i in range(len(trace))]
        obs_reward = None
        env.reset(options={"index": index})
        for k, e in enumerate(trace):  # every trace is a trial the environment ends at its last episode
            obs, obs_reward, done, _, _ = env.step(e)
            assert done == (k == len(trace) - 1)
            if len(trace) == 4 and k == 2:
                assert obs == env.forced_answer_text
        outcomes.append(obs_reward)
    # The gold's place in the search is uniform over the problems, whatever the gold: with a budget of 3 checks and a
    # guess among the 7 left, a trial succeeds with probability 3/10 + 7/10 * 1/7 = 0.4 (focused:
    # exactly the problems whose gold is y, y + 1, y + 2 or the guess y + 3, mod 10).
    n, rate = len(outcomes), float(np.mean(outcomes))
    if variety == 0.0:
        env2 = make()
        expected = []
        for i in range(n):
            env2.reset(options={"index": i})
            expected.append(float((int(env2.reference_answer) - env2.problem.data["y"]) % 10 <= 3))
        assert outcomes == expected
    assert abs(rate - 0.4) < 3.5 * (0.4 * 0.6 / n) ** 0.5, rate


def test_blind_traces_put_the_gold_first_one_time_in_m_not_more():
    """The leak a success filter or an informed expert makes: P(first candidate = gold) is 1/m here."""
    env = make(max_episodes=3)
    rng = np.random.default_rng(1)
    for variety in (0.0, 1.0):  # focused (from y) and varied
        first_is_gold, n = 0, 0
        for _ in range(4 if variety else 1):
            for index in range(env.num_problems):
                env.reset(options={"index": index})
                trace = env.expert_trace(rng, 0, variety)
                first_is_gold += trace[0].endswith(f"Answer: {env.reference_answer}")
                n += 1
        assert abs(first_is_gold / n - 0.1) < 3.5 * (0.1 * 0.9 / n) ** 0.5, (variety, first_is_gold / n)
    # and the focused traces check every candidate, not only the first few residues
    firsts = set()
    for index in range(env.num_problems):
        env.reset(options={"index": index})
        firsts.add(env.expert_trace(rng, 0, 0.0)[0].split(":")[0])
    assert firsts == {f"try {x}" for x in range(10)}
    with pytest.raises(ValueError, match="expert_search must be one of"):
        make(expert_search="oracle")


def test_the_docstring_example():
    env = make()
    env.problem = env._problem(0)
    env.problem = type(env.problem)("p", "7x+3=1 (mod 10)\n", "4", {"a": 7, "b": 3, "y": 1})
    assert env.check_text(2) == "try 2: 7*2+3=17 -> 7" and env.check_text(4) == "try 4: 7*4+3=31 -> 1"
    with pytest.raises(ValueError, match="modulus"):
        make(modulus=1)


def test_write_comparison_writes_y_beside_each_result_and_keeps_the_search():
    """env.write_comparison: every check ends ``-> r vs y``; the candidates, their order and the
    commits are the plain expert's (the same generator draws), so only the text changes."""
    plain, compare = make(max_episodes=3), make(max_episodes=3, write_comparison=True)
    assert not plain.write_comparison and compare.write_comparison
    rng_p, rng_c = np.random.default_rng(3), np.random.default_rng(3)
    longest = 0
    for index in range(plain.num_problems):
        plain.reset(options={"index": index})
        compare.reset(options={"index": index})
        y = compare.problem.data["y"]
        tp, tc = plain.expert_trace(rng_p, 0, 0.5), compare.expert_trace(rng_c, 0, 0.5)
        assert len(tp) == len(tc)
        for ep, ec in zip(tp, tc):
            if not ep.startswith("try "):
                assert ec == ep  # the forced guess has no check
                continue
            head, tail = ep.split(" -> ")
            r, decision = tail.split(" ", 1)
            assert ec == f"{head} -> {r} vs {y} {decision}"
            assert (decision.startswith("Answer:")) == (int(r) == y)  # commits iff the two written digits agree
            longest = max(longest, len(ec))
    assert longest == len("try 4: 7*4+3=31 -> 1 vs 1 Answer: 4") > 32  # longer than the default budget's episode
    compare.problem = type(compare.problem)("p", "7x+3=1 (mod 10)\n", "4", {"a": 7, "b": 3, "y": 1})
    assert compare.check_text(2) == "try 2: 7*2+3=17 -> 7 vs 1"
