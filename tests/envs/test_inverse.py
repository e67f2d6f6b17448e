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
def test_expert_traces_search_with_right_checks(variety):
    env = make(max_episodes=6)
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


def test_the_docstring_example():
    env = make()
    env.problem = env._problem(0)
    env.problem = type(env.problem)("p", "7x+3=1 (mod 10)\n", "4", {"a": 7, "b": 3, "y": 1})
    assert env.check_text(2) == "try 2: 7*2+3=17 -> 7" and env.check_text(4) == "try 4: 7*4+3=31 -> 1"
    with pytest.raises(ValueError, match="modulus"):
        make(modulus=1)
