"""In-context adaptation figures (metarl_llm.evaluation.adaptation): pass@k and maj@k estimators
against hand-computed values and brute force, the episode budgets, and a measurement on a real
policy whose structure is known (m = 1 is the one-episode trials; k of them hold k episodes' tokens)."""

from __future__ import annotations

import itertools
import math

import gymnasium
import numpy as np
import pytest
import torch

import envs
from metarl_llm.config import BudgetConfig, EvalConfig
from metarl_llm.evaluation.adaptation import episode_budget, evaluate_adaptation, maj_at_k, mean_ci, pass_at_k


def test_pass_at_k_is_the_chance_that_a_k_subset_holds_a_success():
    assert pass_at_k(2, 4, 2) == pytest.approx(5 / 6)  # 1 - C(2,2)/C(4,2)
    assert pass_at_k(0, 8, 8) == 0.0 and pass_at_k(1, 8, 8) == 1.0 and pass_at_k(3, 8, 1) == pytest.approx(3 / 8)
    outcomes = [1, 0, 0, 1, 0, 1, 0, 0]
    for k in (1, 2, 4, 8):  # brute force over every k-subset
        subsets = list(itertools.combinations(outcomes, k))
        assert pass_at_k(sum(outcomes), 8, k) == pytest.approx(np.mean([max(s) for s in subsets]))
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(1, 2, 3)


def test_maj_at_k_averages_the_majority_over_subsets():
    answers = ["7", "7", "3", None]
    scores = [1.0, 1.0, 0.0, 0.0]
    rng = np.random.default_rng(0)
    # k = 1: the share of right votes (the None trial does not vote: 0)
    assert maj_at_k(answers, scores, 1, rng) == pytest.approx(0.5)
    # k = 2 subsets: (7,7) 1, (7,3) 1 (tie: first), (7,3) 1, (7,-) 1, (7,-) 1, (3,-) 0
    assert maj_at_k(answers, scores, 2, rng) == pytest.approx(5 / 6)
    assert maj_at_k(["3", "7", "7", "3"], [0, 1, 1, 0], 4, rng) == 0.0  # 2-2 tie: the first given wins
    many = [str(i % 3) for i in range(20)]
    assert 0.0 <= maj_at_k(many, [float(a == "1") for a in many], 10, rng) <= 1.0  # C(20,10) > 256: sampled


def test_episode_budgets_keep_the_tokens_per_episode():
    b = BudgetConfig(max_episodes=3, max_episode_tokens=32, max_total_tokens=96, answer_max_tokens=12)
    assert [(episode_budget(b, m).max_episodes, episode_budget(b, m).max_total_tokens) for m in (1, 2, 4, 8)] == [
        (1, 32), (2, 64), (4, 128), (8, 256)
    ]  # fmt: skip
    assert episode_budget(b, 2).answer_max_tokens == 12
    with pytest.raises(ValueError, match="adaptation_episodes"):
        episode_budget(b, 0)


def test_mean_ci_is_the_normal_interval_over_problems():
    m, h = mean_ci(np.array([0.0, 1.0, 1.0, 0.0]))
    assert m == 0.5 and h == pytest.approx(1.96 * math.sqrt(1 / 3) / 2)
    assert mean_ci(np.array([0.25])) == (0.25, 0.0)


def test_a_measurement_on_a_real_policy(char_policy):
    model, codec = char_policy
    budget = BudgetConfig(max_episodes=2, max_episode_tokens=8, max_total_tokens=16, answer_max_tokens=4)
    cfg = EvalConfig(num_problems=4, samples_per_problem=2, adaptation_episodes=[1, 2, 4])

    def make_env(b):
        return gymnasium.make(envs.ENV_IDS["planted_subseq"], split="test", max_episodes=b.max_episodes)

    fig = evaluate_adaptation(model, codec, budget, cfg, make_env, lambda: torch.Generator().manual_seed(3))
    assert fig["episodes"] == [1, 2, 4] and fig["samples"] == {"sequential": 2, "one_episode": 4}
    assert fig["sequential_success"]["1"] == fig["parallel_pass"]["1"]  # the same one-episode trials
    for m in ("1", "2", "4"):
        assert 1.0 <= fig["sequential_episodes"][m] <= int(m) + 1  # a forced answer is one more episode
        assert fig["sequential_tokens"][m] <= int(m) * 8 + 4  # m episodes' tokens and one forced answer
    one = fig["parallel_tokens"]["1"]
    assert fig["parallel_tokens"]["4"] == pytest.approx(4 * one) and one <= 8 + 4
    p = [fig["parallel_pass"][k] for k in ("1", "2", "4")]
    assert p == sorted(p)  # pass@k never falls with k
    again = evaluate_adaptation(model, codec, budget, cfg, make_env, lambda: torch.Generator().manual_seed(3))
    assert again == fig  # common random numbers: the same draws every time
